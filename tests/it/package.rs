//! The Debian package built by `cargo deb` from `[package.metadata.deb]`: what it installs
//! where, its conffile and maintainer scripts, and that the default config it ships passes
//! `edgerelay check-config` once a certificate is in place.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `$CARGO_DEB`, or the pinned one `scripts/setup-tools` installs.
fn cargo_deb() -> PathBuf {
    if let Ok(p) = std::env::var("CARGO_DEB") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/cargo/bin/cargo-deb");
    assert!(p.exists(), "cargo-deb not found at {}: run scripts/setup-tools", p.display());
    p
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{cmd:?}: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    text
}

#[test]
fn the_package_installs_the_relay_its_unit_user_and_a_config_that_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let deb = tmp.path().join("edgerelay.deb");
    // The test binary's own build (debug profile): the package's layout is what is checked.
    run(Command::new(cargo_deb())
        .args(["-p", "edgerelay", "--no-build", "--profile", "dev", "--no-strip", "-o"])
        .arg(&deb)
        .current_dir(env!("CARGO_MANIFEST_DIR")));

    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in [
        "./usr/bin/edgerelay",
        "./etc/edgerelay/edgerelay.toml",
        "./usr/lib/systemd/system/edgerelay.service",
        "./usr/lib/systemd/system/edgerelay.socket",
        "./usr/lib/systemd/system/edgerelay-quic.socket",
        "./usr/lib/systemd/system/edgerelay-admin.socket",
        "./usr/lib/sysusers.d/edgerelay.conf",
        "./usr/lib/tmpfiles.d/edgerelay.conf",
        "./usr/share/doc/edgerelay/edgerelay.example.toml",
        "./usr/share/doc/edgerelay/operations.md",
        "./usr/share/edgerelay/dashboards/alerts.yml",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} not in the package:\n{listing}"
        );
    }
    let config_line = listing.lines().find(|l| l.ends_with("./etc/edgerelay/edgerelay.toml"));
    assert!(config_line.unwrap().starts_with("-rw-r-----"), "config readable by others");

    let depends = run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Depends"));
    assert!(depends.contains("systemd"), "{depends}");
    let control = tmp.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/edgerelay/edgerelay.toml");
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("systemd-sysusers") && postinst.contains("systemd-tmpfiles"));

    // Installed into a scratch root: the shipped config, its /etc paths moved there and a
    // certificate at its TLS paths, passes the shipped binary's check-config.
    let root = tmp.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    let etc = root.join("etc/edgerelay");
    let shipped = std::fs::read_to_string(etc.join("edgerelay.toml")).unwrap();
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/edgerelay.service"));
    let repo_unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/edgerelay.service"),
    );
    assert_eq!(unit.unwrap(), repo_unit.unwrap(), "the packaged unit is the repository's");
    let moved = shipped.replace("/etc/edgerelay", &etc.display().to_string());
    let config = etc.join("moved.toml");
    std::fs::write(&config, moved).unwrap();
    let relay = root.join("usr/bin/edgerelay");
    let check = |config: &Path| {
        Command::new(&relay).args(["check-config", "--config"]).arg(config).output().unwrap()
    };
    let before = check(&config);
    assert_eq!(before.status.code(), Some(78), "no certificate yet");
    let errors = String::from_utf8_lossy(&before.stderr);
    assert!(errors.lines().filter(|l| l.contains("https.tls_")).count() >= 2, "{errors}");
    edgerelay_ops::dev_certs::generate_dev_certs(&["localhost".into()])
        .unwrap()
        .write(&etc.join("tls"))
        .unwrap();
    let after = check(&config);
    assert!(after.status.success(), "{}", String::from_utf8_lossy(&after.stderr));
}

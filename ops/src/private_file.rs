//! Writing files that hold secrets (private keys, configs with tokens): created with mode 0600
//! from the start, never widened-then-narrowed, so no other user can read them even for a
//! moment. An existing file is narrowed to 0600 before a byte of the new contents goes in.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

/// The mode a secret file gets: read and write for its owner only.
pub const MODE: u32 = 0o600;

/// Writes `contents` to `path`, readable by its owner only (on Unix).
pub fn write(path: &Path, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(MODE);
    }
    let mut file = options.open(path)?;
    // `mode` applies to a file this call creates; one that was there keeps its own.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if file.metadata()?.permissions().mode() & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(MODE))?;
        }
    }
    file.write_all(contents.as_ref())?;
    file.flush()
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_new_file_is_created_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write(&path, "secret").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "secret");
    }

    #[test]
    fn an_existing_readable_file_is_narrowed_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, "an older, longer text").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write(&path, "new").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
    }
}

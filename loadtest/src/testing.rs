//! Test helpers shared by the unit tests: parsing one flag struct on its own (a mode's tests
//! parse its `ModeArgs`), the events its flags describe, and scenario names parsing back.

use clap::Parser;

use crate::events::{EventArgs, Events};

/// A command line made of nothing but `A`'s flags.
#[derive(Debug, Parser)]
struct Cli<A: clap::Args> {
    #[command(flatten)]
    args: A,
}

/// The events of a mode's flags, subjects under `prefix` unless `--subject-prefix` is given.
pub fn events(args: &EventArgs, prefix: &str) -> Events {
    Events::new(args, prefix).expect("valid event flags")
}

/// Parses `argv` (the program name first) into `A`.
pub fn parse<A: clap::Args>(argv: &[&str]) -> Result<A, clap::Error> {
    Cli::<A>::try_parse_from(argv).map(|cli| cli.args)
}

/// Asserts that each of `all` parses back from its CLI `name`.
pub fn assert_names_parse_back<S>(all: &[S], name: fn(S) -> &'static str)
where
    S: clap::ValueEnum + Copy + PartialEq + std::fmt::Debug,
{
    for &s in all {
        let parsed = S::from_str(name(s), false).unwrap();
        assert_eq!(parsed, s);
    }
}

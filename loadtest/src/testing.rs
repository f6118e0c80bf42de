//! Test helpers shared by the unit tests: parsing one flag struct on its own, or a mode's flags
//! with the event shape and load shape every mode takes.

use clap::Parser;

use crate::events::{EventArgs, Events};
use crate::schedule::RunArgs;

/// A command line made of nothing but `A`'s flags.
#[derive(Debug, Parser)]
struct Cli<A: clap::Args> {
    #[command(flatten)]
    args: A,
}

/// A mode's flags with the event and load shape.
#[derive(Debug, clap::Args)]
pub struct Flags<M: clap::Args> {
    #[command(flatten)]
    pub mode: M,

    #[command(flatten)]
    pub events: EventArgs,

    #[command(flatten)]
    pub run: RunArgs,
}

impl<M: clap::Args> Flags<M> {
    /// The events of these flags, subjects under `prefix` unless `--subject-prefix` is given.
    pub fn events(&self, prefix: &str) -> Events {
        Events::new(&self.events, prefix).expect("valid event flags")
    }
}

/// Parses `argv` (the program name first) into `A`.
pub fn parse<A: clap::Args>(argv: &[&str]) -> Result<A, clap::Error> {
    Cli::<A>::try_parse_from(argv).map(|cli| cli.args)
}

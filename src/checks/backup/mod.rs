//! `backup.*` kinds: how old is the newest good backup, from the tool that took it.
//!
//! Every kind that runs a tool does so through [`crate::runner`] (cleared environment plus
//! `env`, optional `run_as`, the check's timeout killing the whole process group, bounded
//! output). A missing binary, a non-zero exit or output that does not parse is `unknown`
//! with the tool's own words; no backup at all is critical, never ok.

pub mod barman;
pub mod files;
pub mod pgbackrest;
pub mod walg;

//! `backup.pgbackrest` (being written).

use std::path::PathBuf;

use indexmap::IndexMap;

use crate::checks::{Check, CheckContext, CheckError, Common, Observation};
use crate::config::types::Duration;

crate::check_config! {
    /// `[check.backup.pgbackrest.NAME]`
    pub struct PgbackrestConfig: Duration {
        /// The stanza.
        pub stanza: String,
        /// Only backups of this type count: "full", "diff" or "incr".
        #[serde(default, rename = "type")]
        pub backup_type: Option<String>,
        /// `--config=` for pgbackrest.
        #[serde(default)]
        pub config: Option<PathBuf>,
        /// The pgbackrest binary (default "pgbackrest", looked up in PATH).
        #[serde(default)]
        pub binary: Option<String>,
        /// Run pgbackrest as this user.
        #[serde(default)]
        pub run_as: Option<String>,
        /// Variables added to its cleared environment.
        #[serde(default)]
        pub env: IndexMap<String, String>,
    }
}

impl PgbackrestConfig {
    /// Kind-specific problems.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        Vec::new()
    }
}

/// A running `backup.pgbackrest` check.
pub struct PgbackrestCheck {}

impl PgbackrestCheck {
    /// Builds the check.
    pub fn from_config(_c: &PgbackrestConfig, _common: &Common) -> Self {
        PgbackrestCheck {}
    }
}

impl Check for PgbackrestCheck {
    async fn run(&mut self, _cx: &CheckContext) -> Result<Observation, CheckError> {
        Err(CheckError::Internal("not yet built".into()))
    }
}

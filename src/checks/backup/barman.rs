//! `backup.barman` (being written).

use indexmap::IndexMap;

use crate::checks::{Check, CheckContext, CheckError, Common, Observation};
use crate::config::types::Duration;

crate::check_config! {
    /// `[check.backup.barman.NAME]`
    pub struct BarmanConfig: Duration {
        /// The Barman server name.
        pub server: String,
        /// The binary.
        #[serde(default)]
        pub binary: Option<String>,
        /// Run it as this user.
        #[serde(default)]
        pub run_as: Option<String>,
        /// Variables added to its cleared environment.
        #[serde(default)]
        pub env: IndexMap<String, String>,
    }
}

impl BarmanConfig {
    /// Kind-specific problems.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        Vec::new()
    }
}

/// A running `backup.barman` check.
pub struct BarmanCheck {}

impl BarmanCheck {
    /// Builds the check.
    pub fn from_config(_c: &BarmanConfig, _common: &Common) -> Self {
        BarmanCheck {}
    }
}

impl Check for BarmanCheck {
    async fn run(&mut self, _cx: &CheckContext) -> Result<Observation, CheckError> {
        Err(CheckError::Internal("not yet built".into()))
    }
}

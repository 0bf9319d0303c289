//! `backup.walg` (being written).

use indexmap::IndexMap;

use crate::checks::{Check, CheckContext, CheckError, Common, Observation};
use crate::config::types::Duration;

crate::check_config! {
    /// `[check.backup.walg.NAME]`
    pub struct WalgConfig: Duration {

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

impl WalgConfig {
    /// Kind-specific problems.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        Vec::new()
    }
}

/// A running `backup.walg` check.
pub struct WalgCheck {}

impl WalgCheck {
    /// Builds the check.
    pub fn from_config(_c: &WalgConfig, _common: &Common) -> Self {
        WalgCheck {}
    }
}

impl Check for WalgCheck {
    async fn run(&mut self, _cx: &CheckContext) -> Result<Observation, CheckError> {
        Err(CheckError::Internal("not yet built".into()))
    }
}

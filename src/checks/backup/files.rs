//! `backup.files` (being written).

use crate::checks::{Check, CheckContext, CheckError, Common, Observation};
use crate::config::types::{ByteSize, Duration};

crate::check_config! {
    /// `[check.backup.files.NAME]`
    pub struct FilesConfig: Duration {
        /// Files to consider, e.g. "/backups/*.dump".
        pub glob: String,
        /// The newest file must be at least this big.
        #[serde(default)]
        pub min_size: Option<ByteSize>,
    }
}

impl FilesConfig {
    /// Kind-specific problems.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        Vec::new()
    }
}

/// A running `backup.files` check.
pub struct FilesCheck {}

impl FilesCheck {
    /// Builds the check.
    pub fn from_config(_c: &FilesConfig, _common: &Common) -> Self {
        FilesCheck {}
    }
}

impl Check for FilesCheck {
    async fn run(&mut self, _cx: &CheckContext) -> Result<Observation, CheckError> {
        Err(CheckError::Internal("not yet built".into()))
    }
}

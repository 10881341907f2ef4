//! Reading a configuration: YAML with line numbers, then checked by compiling it
//! ([`crate::table::RoutingTable::validate`]), so every problem is reported with its file, line
//! and field. Kept apart from [`crate::config`] (the data model, which depends on nothing of the
//! proxy) so the model and the compiler of the model do not import each other.

use std::path::Path;

use crate::config::{Config, ConfigError};

impl Config {
    /// Read, parse and validate a YAML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text, path)?;
        if let Some(dir) = path.parent() {
            let relative_to_dir = |file: &mut std::path::PathBuf| {
                if file.is_relative() {
                    *file = dir.join(&*file);
                }
            };
            if let Some(identity) = &mut config.identity {
                std::iter::once(&mut identity.cert)
                    .chain(std::iter::once(&mut identity.key))
                    .chain(identity.trust_anchors.iter_mut())
                    .for_each(relative_to_dir);
            }
            if let Some(gateway) = &mut config.gateway {
                gateway
                    .certificates
                    .iter_mut()
                    .flat_map(|c| [&mut c.cert, &mut c.key])
                    .for_each(relative_to_dir);
                gateway
                    .jwt
                    .iter_mut()
                    .flat_map(|jwt| jwt.providers.iter_mut())
                    .filter_map(|provider| provider.jwks.file.as_mut())
                    .for_each(relative_to_dir);
            }
            // JWKS files too (`inbound.policy.jwt`, the transparent ports' policies).
            let policies = config.inbound.iter_mut().map(|i| &mut i.policy).chain(
                config
                    .transparent
                    .inbound_ports
                    .iter_mut()
                    .map(|p| &mut p.policy),
            );
            policies
                .filter_map(|policy| policy.jwt.as_mut())
                .flat_map(|jwt| jwt.providers.iter_mut())
                .filter_map(|provider| provider.jwks.file.as_mut())
                .for_each(relative_to_dir);
        }
        Ok(config)
    }

    /// Parse and validate YAML text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = serde_yaml_ng::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.to_string(),
            }
        })?;
        crate::table::RoutingTable::validate(&config).map_err(|invalid| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: line_of(text, &invalid.value),
            field: invalid.field,
            message: invalid.message,
        })?;
        Ok(config)
    }
}

/// 1-based line of the first occurrence of `value` in `text` (0 when not found).
fn line_of(text: &str, value: &str) -> usize {
    if value.is_empty() {
        return 0;
    }
    text.lines()
        .position(|l| l.contains(value))
        .map_or(0, |i| i + 1)
}

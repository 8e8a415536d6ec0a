//! The shared AWS credentials and config files (`~/.aws/credentials`, `~/.aws/config`), read
//! for what the environment does not give: `object_store` reads only the `AWS_*` variables.

use std::collections::HashMap;
use std::path::PathBuf;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};

/// `builder` with the profile's credentials, region and endpoint where the environment has
/// none. The profile is `AWS_PROFILE`, else `default`.
pub fn apply(mut builder: AmazonS3Builder) -> AmazonS3Builder {
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty());
    if !set("AWS_ACCESS_KEY_ID") {
        let creds = read_section(file("AWS_SHARED_CREDENTIALS_FILE", "credentials"), &profile);
        for (field, key) in [
            ("aws_access_key_id", AmazonS3ConfigKey::AccessKeyId),
            ("aws_secret_access_key", AmazonS3ConfigKey::SecretAccessKey),
            ("aws_session_token", AmazonS3ConfigKey::Token),
        ] {
            if let Some(v) = creds.get(field) {
                builder = builder.with_config(key, v);
            }
        }
    }
    // In the config file, profiles other than the default are `[profile NAME]`.
    let section = if profile == "default" {
        profile.clone()
    } else {
        format!("profile {profile}")
    };
    let config = read_section(file("AWS_CONFIG_FILE", "config"), &section);
    if !set("AWS_REGION") && !set("AWS_DEFAULT_REGION") {
        if let Some(region) = config.get("region") {
            builder = builder.with_region(region);
        }
    }
    let env_endpoint = std::env::var("AWS_ENDPOINT_URL")
        .or_else(|_| std::env::var("AWS_ENDPOINT"))
        .ok();
    let endpoint = env_endpoint.or_else(|| config.get("endpoint_url").cloned());
    if let Some(endpoint) = endpoint {
        // An endpoint given as http:// (a MinIO on the LAN, a test server) is taken as meant.
        if endpoint.starts_with("http://") {
            builder = builder.with_allow_http(true);
        }
        builder = builder.with_endpoint(endpoint);
    }
    builder
}

fn file(var: &str, name: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(var) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".aws").join(name))
}

/// The `key = value` lines of `[section]` in an INI file (none when it cannot be read).
fn read_section(path: Option<PathBuf>, section: &str) -> HashMap<String, String> {
    let text = path
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    parse_section(&text, section)
}

fn parse_section(text: &str, section: &str) -> HashMap<String, String> {
    let mut values = HashMap::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                values.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_section_is_read_and_others_are_not() {
        let text = "[default]\naws_access_key_id = A\n\n[profile team]\nregion = eu-west-1\nendpoint_url=http://127.0.0.1:9000\n# comment\n[team]\naws_secret_access_key = S\n";
        assert_eq!(parse_section(text, "default")["aws_access_key_id"], "A");
        let team = parse_section(text, "profile team");
        assert_eq!(team["region"], "eu-west-1");
        assert_eq!(team["endpoint_url"], "http://127.0.0.1:9000");
        assert!(!team.contains_key("aws_access_key_id"));
        assert_eq!(parse_section(text, "team")["aws_secret_access_key"], "S");
    }
}

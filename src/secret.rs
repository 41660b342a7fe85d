//! Secrets kept out of the config file: read from a file (a Kubernetes or Docker
//! secret), and hidden when settings are printed.

use std::path::Path;

/// The secret in `path`: its text without one trailing line end. `setting` names the
/// key that gave the path, for the error (`redis.password_file = /run/secrets/x: ...`).
pub fn read_secret_file(setting: &str, path: &Path) -> Result<String, String> {
    let problem = |what: String| format!("{setting} = {}: {what}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| {
        problem(format!(
            "cannot be read ({e}): mount the secret there, or fix the path"
        ))
    })?;
    let secret = text.strip_suffix('\n').unwrap_or(&text);
    let secret = secret.strip_suffix('\r').unwrap_or(secret);
    if secret.is_empty() {
        return Err(problem("is empty: write the secret into it".into()));
    }
    Ok(secret.to_string())
}

/// Does this librdkafka property hold a secret (`sasl.password`, `ssl.key.password`,
/// `ssl.key.pem`, `sasl.oauthbearer.client.secret`, ...)? Its value is never printed.
pub fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "ssl.key.pem",
        "keystore",
        "sasl.oauthbearer.config",
    ]
    .iter()
    .any(|word| key.contains(word))
}

/// `key = value` pairs as they may be printed: secret values as `***`.
pub fn printable_properties<'a>(
    properties: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Vec<(String, String)> {
    properties
        .into_iter()
        .map(|(k, v)| {
            let v = if is_secret_property(k) {
                "***".to_string()
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_loses_one_line_end_and_must_not_be_empty() {
        let dir = std::env::temp_dir().join(format!("w2c-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "s3 cret\r\n").unwrap();
        assert_eq!(
            read_secret_file("x.password_file", &file).unwrap(),
            "s3 cret"
        );
        std::fs::write(&file, "two\n\n").unwrap();
        assert_eq!(read_secret_file("x.password_file", &file).unwrap(), "two\n");
        std::fs::write(&file, "\n").unwrap();
        let e = read_secret_file("x.password_file", &file).unwrap_err();
        assert!(
            e.starts_with("x.password_file = ") && e.contains("is empty"),
            "{e}"
        );
        let e = read_secret_file("x.password_file", &dir.join("missing")).unwrap_err();
        assert!(e.contains("cannot be read") && e.contains("missing"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secret_properties_are_hidden() {
        for key in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "SASL.PASSWORD",
        ] {
            assert!(is_secret_property(key), "{key}");
        }
        for key in [
            "sasl.username",
            "ssl.ca.location",
            "security.protocol",
            "linger.ms",
        ] {
            assert!(!is_secret_property(key), "{key}");
        }
    }
}

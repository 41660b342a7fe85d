//! The rules file as written: serde types that reject unknown fields, loaded with the
//! `config` crate from one file or every `*.toml` of a directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRulesFile {
    #[serde(default, rename = "rule")]
    pub rules: Vec<RawRule>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: String,
    /// Schema-qualified: `public.products`.
    pub table: String,
    #[serde(default)]
    pub on: Option<Vec<String>>,
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub when_changed: Option<Vec<String>>,
    #[serde(default)]
    pub truncate_tags: Option<Vec<String>>,
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    #[serde(default)]
    pub ttl: Option<String>,
}

/// A rule and the file it came from.
#[derive(Debug, Clone)]
pub struct SourcedRule {
    pub file: PathBuf,
    pub rule: RawRule,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "rules path {0} does not exist: set rules.path to a rules file or a directory of *.toml"
    )]
    Missing(PathBuf),
    #[error("cannot read rules directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rules directory {0} holds no *.toml file")]
    Empty(PathBuf),
    #[error("rules file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// The files a rules path stands for, in name order.
pub fn files(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(LoadError::Missing(path.to_path_buf()));
    }
    let dir_err = |source| LoadError::Dir {
        path: path.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(dir_err)? {
        let p = entry.map_err(dir_err)?.path();
        if p.is_file() && p.extension().is_some_and(|e| e == "toml") {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(LoadError::Empty(path.to_path_buf()));
    }
    Ok(files)
}

/// Every rule of every file, in file order then rule order.
pub fn load(path: &Path) -> Result<Vec<SourcedRule>, LoadError> {
    let mut out = Vec::new();
    for file in files(path)? {
        let parse_err = |message: String| LoadError::Parse {
            path: file.clone(),
            message,
        };
        let parsed: RawRulesFile = config::Config::builder()
            .add_source(config::File::from(file.as_path()).format(config::FileFormat::Toml))
            .build()
            .map_err(|e| parse_err(e.to_string()))?
            .try_deserialize()
            .map_err(|e| parse_err(e.to_string()))?;
        out.extend(parsed.rules.into_iter().map(|rule| SourcedRule {
            file: file.clone(),
            rule,
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_directory_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("b.toml"),
            "[[rule]]\nname = \"b\"\ntable = \"public.b\"\nkeys = [\"b:{id}\"]\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("a.toml"),
            "[[rule]]\nname = \"a1\"\ntable = \"public.a\"\nkeys = [\"a:{id}\"]\n\
             [[rule]]\nname = \"a2\"\ntable = \"public.a\"\nkeys = [\"a2:{id}\"]\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let rules = load(dir.path()).unwrap();
        let names: Vec<_> = rules.iter().map(|r| r.rule.name.as_str()).collect();
        assert_eq!(names, ["a1", "a2", "b"]);
    }

    #[test]
    fn unknown_fields_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("r.toml");
        std::fs::write(
            &file,
            "[[rule]]\nname = \"x\"\ntable = \"public.x\"\nkeyz = []\n",
        )
        .unwrap();
        let err = load(&file).unwrap_err().to_string();
        assert!(err.contains("keyz") && err.contains("r.toml"), "{err}");
    }

    #[test]
    fn missing_and_empty_paths_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(load(dir.path()), Err(LoadError::Empty(_))));
        assert!(matches!(
            load(&dir.path().join("nope")),
            Err(LoadError::Missing(_))
        ));
    }
}

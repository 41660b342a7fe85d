//! The rules file: which tables matter and what each change to them invalidates.
//! `raw` holds the file's types as written; the compiled, validated form builds on it.

pub mod raw;

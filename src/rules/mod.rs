//! The rules file: which tables matter and what each change to them invalidates.
//! `raw` holds the file's types as written, `compile` turns them into a rule set that
//! is valid by construction, `bind` resolves them against a table's shape, `plan` turns changes into plans
//! (`crate::plan`), `message` reads the invalidation messages, `check` validates the
//! rules against the live catalog.

pub mod bind;
pub mod check;
pub mod compile;
pub mod message;
pub mod plan;
pub mod raw;
pub mod template;

pub use compile::{load, Action, Rule, RuleSet, RulesError};
pub use message::{plan_message, MessageError};
pub use plan::{plan_slot_loss, Planner};

/// Rule sets from text, for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use crate::rules::compile::{self, RuleSet};
    use crate::rules::raw::{RawRulesFile, SourcedRule};

    pub(crate) fn rule_set(text: &str) -> Arc<RuleSet> {
        let file: RawRulesFile = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        let raw = file
            .rules
            .into_iter()
            .map(|rule| SourcedRule {
                file: "rules.toml".into(),
                rule,
            })
            .collect();
        Arc::new(compile::compile(raw).unwrap())
    }
}

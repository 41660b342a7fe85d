//! The rules file: which tables matter and what each change to them invalidates.
//! `raw` holds the file's types as written, `compile` turns them into a rule set that
//! is valid by construction, `plan` turns changes into plans, `check` validates the
//! rules against the live catalog.

pub mod check;
pub mod compile;
pub mod plan;
pub mod raw;
pub mod template;

pub use compile::{load, Action, Rule, RuleSet, RulesError};
pub use plan::{plan_message, Note, NoteKind, Plan, PlanError, Planner, Republish};

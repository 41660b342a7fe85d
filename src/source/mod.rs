//! The source: the replication connection, our pgoutput decoder, the relation cache
//! and typed row changes with their commit boundaries. The publication and the slot
//! are ensured over an ordinary connection; the stream confirms a position only when
//! the pipeline says so.

pub mod catalog;
pub mod change;
pub mod conninfo;
pub mod error;
pub mod identity;
pub mod lineage;
pub mod membership;
pub mod messages;
pub mod monitor;
pub mod pace;
pub mod pgoutput;
pub mod relations;
pub mod slot;
pub mod snapshot;
pub mod stream;
pub mod table;
pub mod target;
pub mod tls;
pub mod value;
pub mod visibility;

pub use change::{Change, CommitInfo, Op, Relation, Row, SourceEvent, TxnInfo, Value};
pub use error::{ErrorKind, SourceError};
pub use slot::{SetupPlan, SetupReport};
pub use stream::{Confirmer, Source, StreamConfig};
pub use table::TableName;
pub use target::PgTarget;

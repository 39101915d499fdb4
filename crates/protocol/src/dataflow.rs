//! [`DataflowDescription`]: what a replica builds for one `CreateDataflow` command, and its validation.
//!
//! A dataflow imports storage collections ([`SourceImport`]) and indexes of other dataflows on the same
//! instance ([`IndexImport`]), builds a sequence of objects from [`Plan`]s (each may `Get` the imports and
//! the objects before it), and exports some of those objects as compute collections: indexes
//! ([`IndexExport`]) and sinks ([`SinkExport`]: materialized views, subscribes, copy-to). It computes from
//! `as_of` on and may stop at `until`.
//!
//! [`DataflowDescription::validate`] is run by the controller before sending and by the replica on
//! receipt; it checks ids, arities and types through every plan and returns a typed error naming the
//! problem.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use frontiers::{Antichain, Timestamp};

use crate::id::GlobalId;
use crate::plan::{Plan, PlanError};
use crate::row::{RelationDesc, RelationType};

/// A storage collection the dataflow reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceImport {
    /// The collection's schema.
    pub desc: RelationDesc,
}

/// An index (arrangement) of another dataflow on the same instance that this dataflow reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexImport {
    /// The schema of the indexed rows.
    pub desc: RelationDesc,
    /// The index's key columns.
    pub key: Vec<usize>,
}

/// An object the dataflow builds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildDesc {
    /// The object's id, referenced by later plans and exports. Not a collection of its own.
    pub id: GlobalId,
    /// How to compute it.
    pub plan: Plan,
}

/// An index the dataflow exports: an arrangement of a built object by `key`, kept for peeks and for other
/// dataflows to import.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexExport {
    /// The built object it indexes.
    pub on_id: GlobalId,
    /// The key columns.
    pub key: Vec<usize>,
}

/// Where a sink's output goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SinkConnection {
    /// Written back to the storage collection `target` with compare-and-append (a materialized view).
    MaterializedView {
        /// The storage collection; its schema must be the sink's `desc`.
        target: GlobalId,
    },
    /// Streamed to the controller as `SubscribeResponse` batches.
    Subscribe {
        /// Whether the first batch holds the snapshot at the as-of (otherwise only changes after it).
        with_snapshot: bool,
    },
    /// A one-shot snapshot at the as-of, written as CSV files into `directory`.
    CopyTo {
        /// The directory (created if missing) that receives one file per worker.
        directory: String,
    },
}

/// A sink the dataflow exports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkExport {
    /// The built object whose contents it emits.
    pub from: GlobalId,
    /// The schema of the emitted rows (the object's type, with names).
    pub desc: RelationDesc,
    /// Where the output goes.
    pub connection: SinkConnection,
}

/// A dataflow to build on a replica. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "T: Timestamp")]
pub struct DataflowDescription<T = u64> {
    /// A name for logs and introspection.
    pub debug_name: String,
    /// Storage collections read, with their schemas.
    pub source_imports: BTreeMap<GlobalId, SourceImport>,
    /// Indexes of other dataflows read.
    pub index_imports: BTreeMap<GlobalId, IndexImport>,
    /// Objects built, in dependency order.
    pub objects_to_build: Vec<BuildDesc>,
    /// Indexes exported.
    pub index_exports: BTreeMap<GlobalId, IndexExport>,
    /// Sinks exported.
    pub sink_exports: BTreeMap<GlobalId, SinkExport>,
    /// The first time computed. Required (and non-empty) by [`validate`](Self::validate); the controller
    /// fills it in with `select_as_of` when the caller leaves it `None`.
    pub as_of: Option<Antichain<T>>,
    /// The dataflow need not compute at or beyond `until` (empty: forever).
    pub until: Antichain<T>,
}

/// Why a dataflow description was rejected. Each variant names the offending id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DataflowValidationError {
    /// `as_of` is `None`.
    #[error("dataflow {0:?} has no as_of")]
    MissingAsOf(String),
    /// `as_of` is the empty frontier.
    #[error("dataflow {0:?} has an empty as_of")]
    EmptyAsOf(String),
    /// The dataflow exports nothing.
    #[error("dataflow {0:?} exports nothing")]
    NoExports(String),
    /// An id is used twice among imports, objects and exports.
    #[error("id {0} is defined more than once")]
    DuplicateId(GlobalId),
    /// A plan does not type-check.
    #[error("object {id}: {error}")]
    Plan {
        /// The object.
        id: GlobalId,
        /// The plan's error.
        error: PlanError,
    },
    /// An export of an id that is not a built object.
    #[error("export {export} refers to {object}, which the dataflow does not build")]
    UnknownObject {
        /// The export.
        export: GlobalId,
        /// The id it refers to.
        object: GlobalId,
    },
    /// An index key or index import key column beyond the arity.
    #[error("index {id}: key column {column} does not exist (arity {arity})")]
    KeyOutOfRange {
        /// The index.
        id: GlobalId,
        /// The column.
        column: usize,
        /// The indexed relation's arity.
        arity: usize,
    },
    /// A sink whose declared schema differs from its object's type.
    #[error("sink {id}: declared type {declared:?} differs from its object's type {actual:?}")]
    SinkTypeMismatch {
        /// The sink.
        id: GlobalId,
        /// Its `desc`'s types.
        declared: RelationType,
        /// The object's type.
        actual: RelationType,
    },
    /// The as-of is at or beyond `until`: the dataflow would compute nothing.
    #[error("dataflow {0:?} has an as_of beyond its until")]
    AsOfBeyondUntil(String),
}

impl<T: Timestamp> DataflowDescription<T> {
    /// An empty description (add imports, objects and exports, then set `as_of`).
    pub fn new(debug_name: impl Into<String>) -> Self {
        DataflowDescription {
            debug_name: debug_name.into(),
            source_imports: BTreeMap::new(),
            index_imports: BTreeMap::new(),
            objects_to_build: Vec::new(),
            index_exports: BTreeMap::new(),
            sink_exports: BTreeMap::new(),
            as_of: None,
            until: Antichain::new(),
        }
    }

    /// The ids of every import (storage and index).
    pub fn import_ids(&self) -> impl Iterator<Item = GlobalId> + '_ {
        self.source_imports.keys().chain(self.index_imports.keys()).copied()
    }

    /// The ids of every export (indexes and sinks): the compute collections this dataflow creates.
    pub fn export_ids(&self) -> impl Iterator<Item = GlobalId> + '_ {
        self.index_exports.keys().chain(self.sink_exports.keys()).copied()
    }

    /// The type of a built object, if the dataflow builds it and it type-checks.
    pub fn object_type(&self, id: GlobalId) -> Option<RelationType> {
        let types = self.object_types().ok()?;
        types.get(&id).cloned()
    }

    /// The types of every import and built object, type-checking every plan in order.
    fn object_types(&self) -> Result<BTreeMap<GlobalId, RelationType>, DataflowValidationError> {
        let mut types: BTreeMap<GlobalId, RelationType> = BTreeMap::new();
        for (id, import) in &self.source_imports {
            types.insert(*id, import.desc.typ().clone());
        }
        for (id, import) in &self.index_imports {
            if let Some(column) = import.key.iter().find(|c| **c >= import.desc.arity()) {
                return Err(DataflowValidationError::KeyOutOfRange {
                    id: *id,
                    column: *column,
                    arity: import.desc.arity(),
                });
            }
            if types.insert(*id, import.desc.typ().clone()).is_some() {
                return Err(DataflowValidationError::DuplicateId(*id));
            }
        }
        for object in &self.objects_to_build {
            let typ = object
                .plan
                .typ(&|id| types.get(&id).cloned())
                .map_err(|error| DataflowValidationError::Plan { id: object.id, error })?;
            if types.insert(object.id, typ).is_some() {
                return Err(DataflowValidationError::DuplicateId(object.id));
            }
        }
        Ok(types)
    }

    /// Checks the description: `as_of` present and non-empty, at least one export, ids unique, every plan
    /// type-checks with every `Get` resolved to an import or an earlier object, exports refer to built
    /// objects, keys are in range, and sinks' declared types match.
    ///
    /// # Examples
    /// ```
    /// use protocol::{ColumnType, DataflowDescription, DataflowValidationError, GlobalId, RelationDesc, ScalarType};
    /// use protocol::{BuildDesc, IndexExport, Plan, SourceImport};
    /// use frontiers::Antichain;
    /// let desc = RelationDesc::empty().with_column("x", ColumnType::new(ScalarType::Int64, false));
    /// let mut df = DataflowDescription::<u64>::new("example");
    /// df.source_imports.insert(GlobalId::User(1), SourceImport { desc });
    /// df.objects_to_build.push(BuildDesc { id: GlobalId::User(2), plan: Plan::get(GlobalId::User(1)) });
    /// df.index_exports.insert(GlobalId::User(3), IndexExport { on_id: GlobalId::User(2), key: vec![0] });
    /// assert_eq!(df.validate(), Err(DataflowValidationError::MissingAsOf("example".into())));
    /// df.as_of = Some(Antichain::from_elem(0));
    /// assert_eq!(df.validate(), Ok(()));
    /// df.index_exports.insert(GlobalId::User(4), IndexExport { on_id: GlobalId::User(1), key: vec![0] });
    /// assert!(matches!(df.validate(), Err(DataflowValidationError::UnknownObject { .. })));
    /// ```
    pub fn validate(&self) -> Result<(), DataflowValidationError> {
        let as_of = self
            .as_of
            .as_ref()
            .ok_or_else(|| DataflowValidationError::MissingAsOf(self.debug_name.clone()))?;
        if as_of.is_empty() {
            return Err(DataflowValidationError::EmptyAsOf(self.debug_name.clone()));
        }
        if !self.until.is_empty() && frontiers::PartialOrder::less_equal(&self.until, as_of) {
            return Err(DataflowValidationError::AsOfBeyondUntil(self.debug_name.clone()));
        }
        if self.index_exports.is_empty() && self.sink_exports.is_empty() {
            return Err(DataflowValidationError::NoExports(self.debug_name.clone()));
        }
        let types = self.object_types()?;
        let built: BTreeSet<GlobalId> = self.objects_to_build.iter().map(|o| o.id).collect();
        let mut seen: BTreeSet<GlobalId> = types.keys().copied().collect();
        for (id, export) in &self.index_exports {
            if !seen.insert(*id) {
                return Err(DataflowValidationError::DuplicateId(*id));
            }
            if !built.contains(&export.on_id) {
                return Err(DataflowValidationError::UnknownObject { export: *id, object: export.on_id });
            }
            let arity = types[&export.on_id].arity();
            if let Some(column) = export.key.iter().find(|c| **c >= arity) {
                return Err(DataflowValidationError::KeyOutOfRange { id: *id, column: *column, arity });
            }
        }
        for (id, sink) in &self.sink_exports {
            if !seen.insert(*id) {
                return Err(DataflowValidationError::DuplicateId(*id));
            }
            if !built.contains(&sink.from) {
                return Err(DataflowValidationError::UnknownObject { export: *id, object: sink.from });
            }
            let actual = &types[&sink.from];
            let declared = sink.desc.typ();
            let compatible = declared.arity() == actual.arity()
                && declared.column_types.iter().zip(&actual.column_types).all(|(d, a)| {
                    // A sink may declare a column nullable that the plan proves non-null, not the reverse.
                    d.scalar_type == a.scalar_type && (d.nullable || !a.nullable)
                });
            if !compatible {
                return Err(DataflowValidationError::SinkTypeMismatch {
                    id: *id,
                    declared: declared.clone(),
                    actual: actual.clone(),
                });
            }
        }
        Ok(())
    }
}

//! A model replica: the installed state a command stream produces, for comparing a compacted replay with
//! the uncompacted stream, and a tiny dataflow builder for tests.

use std::collections::{BTreeMap, BTreeSet};

use frontiers::Antichain;
use protocol::{
    BuildDesc, ColumnType, ComputeCommand, ComputeParameters, DataflowDescription, GlobalId, IndexExport,
    InstanceConfig, PeekId, Plan, RelationDesc, ScalarType, SourceImport,
};

/// One installed dataflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDataflow {
    pub name: String,
    /// Export → latest compaction frontier (`None` until an `AllowCompaction`).
    pub exports: BTreeMap<GlobalId, Option<Antichain<u64>>>,
    pub scheduled: bool,
}

/// What a replica has installed after a command stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelReplica {
    pub instance: Option<InstanceConfig>,
    pub parameters: ComputeParameters,
    pub allow_writes: bool,
    /// Keyed by the dataflow's smallest export id.
    pub dataflows: BTreeMap<GlobalId, ModelDataflow>,
    pub peeks: BTreeSet<PeekId>,
}

impl ModelReplica {
    pub fn apply(&mut self, command: &ComputeCommand<u64>) {
        match command {
            ComputeCommand::CreateInstance(config) => self.instance = Some(config.clone()),
            ComputeCommand::UpdateConfiguration(p) => self.parameters.update(p.clone()),
            ComputeCommand::AllowWrites => self.allow_writes = true,
            ComputeCommand::CreateDataflow(desc) => {
                let exports: BTreeMap<_, _> = desc.export_ids().map(|id| (id, None)).collect();
                let key = *exports.keys().next().expect("dataflows export something");
                self.dataflows
                    .insert(key, ModelDataflow { name: desc.debug_name.clone(), exports, scheduled: false });
            }
            ComputeCommand::Schedule(id) => {
                if let Some(df) = self.dataflow_mut(*id) {
                    df.scheduled = true;
                }
            }
            ComputeCommand::AllowCompaction { id, frontier } => {
                if let Some(df) = self.dataflow_mut(*id) {
                    df.exports.insert(*id, Some(frontier.clone()));
                }
                self.dataflows
                    .retain(|_, df| !df.exports.values().all(|f| f.as_ref().is_some_and(|f| f.is_empty())));
            }
            ComputeCommand::Peek(peek) => {
                self.peeks.insert(peek.uuid);
            }
            ComputeCommand::CancelPeek { uuid } => {
                self.peeks.remove(uuid);
            }
            ComputeCommand::Hello { .. } | ComputeCommand::InitializationComplete => {}
        }
    }

    fn dataflow_mut(&mut self, export: GlobalId) -> Option<&mut ModelDataflow> {
        self.dataflows.values_mut().find(|df| df.exports.contains_key(&export))
    }
}

/// A dataflow over one storage collection exporting `exports` indexes (ids `first..first + exports`).
pub fn dataflow(name: &str, first: u64, exports: u64, as_of: u64) -> DataflowDescription<u64> {
    let mut df = DataflowDescription::new(name);
    let source = GlobalId::System(1);
    df.source_imports.insert(
        source,
        SourceImport { desc: RelationDesc::new([("x", ColumnType::new(ScalarType::Int64, false))]) },
    );
    let object = GlobalId::Transient(first);
    df.objects_to_build.push(BuildDesc { id: object, plan: Plan::get(source) });
    for id in first..first + exports {
        df.index_exports.insert(GlobalId::User(id), IndexExport { on_id: object, key: vec![0] });
    }
    df.as_of = Some(Antichain::from_elem(as_of));
    df
}

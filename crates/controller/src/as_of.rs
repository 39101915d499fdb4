//! As-of selection for new dataflows: the freshest valid as-of given the imports' frontiers and the
//! exports' constraints.
//!
//! The arithmetic on import frontiers lives in `frontiers::as_of`; this module adds the export
//! constraints. A materialized view writing into a storage collection that already holds data must start
//! *just below* the collection's upper: its snapshot then lands at a time the sink skips (already written),
//! and its changes continue exactly where the data ends. If the inputs can no longer be read that far back,
//! there is no valid as-of and the caller gets an error, not a view with duplicated or missing rows.
//! The target's upper is read here only to choose the as-of; afterwards the instance follows it (the
//! view's upper is its target's storage upper, see `InstanceCore::storage_upper`).
//!
//! **Invariant:** every as-of returned is beyond every import's since and before `until` (tested below;
//! through the API in `tests/it/api_errors.rs` (no valid as-of) and `tests/it/e2e.rs` (an as-of chosen
//! again after a since overtook it)).

use std::collections::BTreeMap;

use frontiers::antichain::{join, meet, step_back};
use frontiers::as_of::freshest_valid_as_of;
use frontiers::{Antichain, PartialOrder, Timestamp};
use protocol::{DataflowDescription, GlobalId, SinkConnection};

/// The frontiers of one import (or sink target), as known when the as-of is selected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportFrontiers<T> {
    /// Its since.
    pub since: Antichain<T>,
    /// Its upper.
    pub upper: Antichain<T>,
}

/// Why no as-of could be selected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AsOfSelectionError {
    /// An import (or sink target) whose frontiers were not provided.
    #[error("no frontiers known for {0}")]
    MissingFrontiers(GlobalId),
    /// An import is fully compacted: nothing is readable.
    #[error("import {0} is fully compacted")]
    ImportCompacted(GlobalId),
    /// A materialized view's target is sealed (its upper is the empty frontier): the view could write
    /// nothing at any as-of.
    #[error("materialized view target {0} is sealed")]
    TargetSealed(GlobalId),
    /// A materialized view's target has data that the inputs can no longer reproduce.
    #[error(
        "materialized view target {target} is written up to {upper}, but the inputs are compacted to {since}"
    )]
    TargetAhead {
        /// The storage collection.
        target: GlobalId,
        /// Its upper, rendered.
        upper: String,
        /// The inputs' least valid as-of, rendered.
        since: String,
    },
    /// The as-of would be at or beyond the dataflow's `until`.
    #[error("as_of {as_of} is not before until {until}")]
    BeyondUntil {
        /// The candidate as-of, rendered.
        as_of: String,
        /// The until, rendered.
        until: String,
    },
}

/// Selects the freshest valid as-of for `desc`.
///
/// `frontiers` must hold every import's frontiers and, for each materialized view sink, its target's.
///
/// # Examples
/// ```
/// use std::collections::BTreeMap;
/// use frontiers::Antichain;
/// use protocol::{BuildDesc, ColumnType, DataflowDescription, GlobalId, IndexExport, Plan, RelationDesc, ScalarType, SourceImport};
/// use controller::{ImportFrontiers, select_as_of};
/// let mut df = DataflowDescription::<u64>::new("idx");
/// df.source_imports.insert(GlobalId::User(1), SourceImport { desc: RelationDesc::new([("x", ColumnType::new(ScalarType::Int64, false))]) });
/// df.objects_to_build.push(BuildDesc { id: GlobalId::Transient(1), plan: Plan::get(GlobalId::User(1)) });
/// df.index_exports.insert(GlobalId::User(2), IndexExport { on_id: GlobalId::Transient(1), key: vec![0] });
/// let f = |since: u64, upper: u64| ImportFrontiers { since: Antichain::from_elem(since), upper: Antichain::from_elem(upper) };
/// let frontiers = BTreeMap::from([(GlobalId::User(1), f(10, 50))]);
/// assert_eq!(select_as_of(&df, &frontiers).unwrap(), Antichain::from_elem(49));
/// ```
pub fn select_as_of<T: Timestamp>(
    desc: &DataflowDescription<T>,
    frontiers: &BTreeMap<GlobalId, ImportFrontiers<T>>,
) -> Result<Antichain<T>, AsOfSelectionError> {
    let mut imports = Vec::new();
    for id in desc.import_ids() {
        let f = frontiers.get(&id).ok_or(AsOfSelectionError::MissingFrontiers(id))?;
        if f.since.is_empty() {
            return Err(AsOfSelectionError::ImportCompacted(id));
        }
        imports.push(f);
    }
    let least = frontiers::as_of::least_valid_as_of(imports.iter().map(|f| f.since.borrow()));
    let mut as_of = freshest_valid_as_of(
        imports.iter().map(|f| f.since.borrow()),
        imports.iter().map(|f| f.upper.borrow()),
    );

    // Materialized views into collections that already hold data start just below the data's end.
    let mut target_bound: Option<Antichain<T>> = None;
    for sink in desc.sink_exports.values() {
        if let SinkConnection::MaterializedView { target } = &sink.connection {
            let f = frontiers.get(target).ok_or(AsOfSelectionError::MissingFrontiers(*target))?;
            if f.upper.is_empty() {
                return Err(AsOfSelectionError::TargetSealed(*target));
            }
            let written = !f.upper.less_equal(&T::minimum());
            if written {
                let bound = step_back(&f.upper.borrow());
                target_bound = Some(match target_bound {
                    None => bound,
                    Some(previous) => meet(&previous.borrow(), &bound.borrow()),
                });
            }
        }
    }
    if let Some(bound) = target_bound {
        if !PartialOrder::less_equal(&least, &bound) {
            let target = desc
                .sink_exports
                .values()
                .find_map(|s| match s.connection {
                    SinkConnection::MaterializedView { target } => Some(target),
                    _ => None,
                })
                .expect("a bound comes from a materialized view");
            return Err(AsOfSelectionError::TargetAhead {
                target,
                upper: format!("{:?}", frontiers[&target].upper.elements()),
                since: format!("{:?}", least.elements()),
            });
        }
        as_of = bound;
    }
    as_of = join(&as_of.borrow(), &least.borrow());
    if !desc.until.is_empty() && PartialOrder::less_equal(&desc.until, &as_of) {
        return Err(AsOfSelectionError::BeyondUntil {
            as_of: format!("{:?}", as_of.elements()),
            until: format!("{:?}", desc.until.elements()),
        });
    }
    Ok(as_of)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{
        BuildDesc, ColumnType, IndexExport, Plan, RelationDesc, ScalarType, SinkExport, SourceImport,
    };

    fn f(since: u64, upper: u64) -> ImportFrontiers<u64> {
        ImportFrontiers { since: Antichain::from_elem(since), upper: Antichain::from_elem(upper) }
    }

    fn dataflow(mv: bool) -> DataflowDescription<u64> {
        let desc = RelationDesc::new([("x", ColumnType::new(ScalarType::Int64, false))]);
        let mut df = DataflowDescription::new("t");
        for id in [1, 2] {
            df.source_imports.insert(GlobalId::User(id), SourceImport { desc: desc.clone() });
        }
        df.objects_to_build
            .push(BuildDesc { id: GlobalId::Transient(1), plan: Plan::get(GlobalId::User(1)) });
        df.index_exports
            .insert(GlobalId::User(3), IndexExport { on_id: GlobalId::Transient(1), key: vec![0] });
        if mv {
            df.sink_exports.insert(
                GlobalId::User(4),
                SinkExport {
                    from: GlobalId::Transient(1),
                    desc,
                    connection: SinkConnection::MaterializedView { target: GlobalId::User(9) },
                },
            );
        }
        df
    }

    #[test]
    fn as_of_selection_table() {
        let s = |t| Ok(Antichain::from_elem(t));
        type Case = (
            &'static str,
            bool,
            Vec<(u64, ImportFrontiers<u64>)>,
            Result<Antichain<u64>, AsOfSelectionError>,
        );
        let cases: Vec<Case> = vec![
            ("freshest common time", false, vec![(1, f(5, 20)), (2, f(8, 30))], s(19)),
            (
                "imports with no common readable time wait at the join of sinces",
                false,
                vec![(1, f(5, 6)), (2, f(8, 30))],
                s(8),
            ),
            (
                "an empty materialized view target does not constrain",
                true,
                vec![(1, f(5, 20)), (2, f(8, 30)), (9, f(0, 0))],
                s(19),
            ),
            (
                "a written target pins the as-of below its upper",
                true,
                vec![(1, f(5, 20)), (2, f(8, 30)), (9, f(0, 12))],
                s(11),
            ),
            (
                "a target ahead of the inputs' compaction has no valid as-of",
                true,
                vec![(1, f(5, 20)), (2, f(8, 30)), (9, f(0, 7))],
                Err(AsOfSelectionError::TargetAhead {
                    target: GlobalId::User(9),
                    upper: "[7]".to_string(),
                    since: "[8]".to_string(),
                }),
            ),
        ];
        for (name, mv, imports, expected) in cases {
            let frontiers: BTreeMap<_, _> =
                imports.into_iter().map(|(id, f)| (GlobalId::User(id), f)).collect();
            assert_eq!(select_as_of(&dataflow(mv), &frontiers), expected, "{name}");
        }
        let sealed = ImportFrontiers { since: Antichain::from_elem(0), upper: Antichain::new() };
        let frontiers = BTreeMap::from([
            (GlobalId::User(1), f(5, 20)),
            (GlobalId::User(2), f(8, 30)),
            (GlobalId::User(9), sealed),
        ]);
        assert_eq!(
            select_as_of(&dataflow(true), &frontiers),
            Err(AsOfSelectionError::TargetSealed(GlobalId::User(9))),
            "a sealed target refuses the view rather than giving it an empty as-of"
        );
        let missing = select_as_of(&dataflow(false), &BTreeMap::from([(GlobalId::User(1), f(0, 1))]));
        assert_eq!(missing, Err(AsOfSelectionError::MissingFrontiers(GlobalId::User(2))));
        let compacted = ImportFrontiers { since: Antichain::new(), upper: Antichain::new() };
        let frontiers = BTreeMap::from([(GlobalId::User(1), compacted), (GlobalId::User(2), f(0, 1))]);
        assert_eq!(
            select_as_of(&dataflow(false), &frontiers),
            Err(AsOfSelectionError::ImportCompacted(GlobalId::User(1)))
        );
    }

    #[test]
    fn an_as_of_at_or_beyond_until_is_refused_and_one_before_it_is_chosen() {
        let frontiers = BTreeMap::from([(GlobalId::User(1), f(5, 20)), (GlobalId::User(2), f(8, 30))]);
        // (until, expected): the freshest common time is 19.
        type Case = (Antichain<u64>, Result<Antichain<u64>, AsOfSelectionError>);
        let table: [Case; 4] = [
            (Antichain::new(), Ok(Antichain::from_elem(19))),
            (Antichain::from_elem(20), Ok(Antichain::from_elem(19))),
            (
                Antichain::from_elem(19),
                Err(AsOfSelectionError::BeyondUntil { as_of: "[19]".to_string(), until: "[19]".to_string() }),
            ),
            (
                Antichain::from_elem(12),
                Err(AsOfSelectionError::BeyondUntil { as_of: "[19]".to_string(), until: "[12]".to_string() }),
            ),
        ];
        for (until, expected) in table {
            let df = DataflowDescription { until: until.clone(), ..dataflow(false) };
            assert_eq!(select_as_of(&df, &frontiers), expected, "until {until:?}");
        }
    }
}

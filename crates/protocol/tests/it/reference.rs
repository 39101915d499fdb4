//! The reference interpreter's peek steps against the IR's own (which the replica runs): two
//! implementations written separately, on random inputs. `reference::map_filter_project` against
//! `MapFilterProject::apply`, and `reference::finish` against `RowSetFinishing::finish`.

use std::num::NonZeroU64;

use proptest::prelude::*;
use protocol::arbitrary::{Choices, expr_of, relation_desc, row_of};
use protocol::reference::{self, Multiset};
use protocol::{ColumnOrder, MapFilterProject, RelationDesc, Row, RowSetFinishing, ScalarType};

/// A schema, some rows of it with multiplicities, and choices for the generators.
fn input() -> impl Strategy<Value = (RelationDesc, Vec<(Row, i64)>, Vec<u32>)> {
    relation_desc().prop_flat_map(|desc| {
        let rows = prop::collection::vec((row_of(desc.typ()), -2i64..4), 0..12);
        (Just(desc), rows, prop::collection::vec(any::<u32>(), 1..40))
    })
}

/// A map/filter/project over `desc` from `choices`: one or two expressions, a predicate, a projection.
fn mfp_of(desc: &RelationDesc, choices: &mut Choices) -> MapFilterProject {
    let mut typ = desc.typ().clone();
    let mut mfp = MapFilterProject::new(desc.arity());
    for _ in 0..1 + choices.pick(2) {
        let want = [ScalarType::Int64, ScalarType::Bool, ScalarType::Text][choices.pick(3)];
        let expr = expr_of(choices, &typ, want, 2);
        typ.column_types.push(expr.typ(&typ).expect("well-typed"));
        mfp = mfp.map([expr]);
    }
    mfp = mfp.filter([expr_of(choices, &typ, ScalarType::Bool, 2)]);
    let columns: Vec<usize> = (0..1 + choices.pick(3)).map(|_| choices.pick(typ.arity())).collect();
    mfp.project(columns)
}

proptest! {
    #[test]
    fn the_reference_maps_filters_and_projects_as_the_ir_does((desc, rows, choices) in input()) {
        let mfp = mfp_of(&desc, &mut Choices::new(choices));
        let multiset = reference::consolidate(rows);
        let expected = reference::map_filter_project(&mfp, &multiset);
        let mut applied: Result<Vec<(Row, i64)>, _> = Ok(Vec::new());
        for (row, diff) in &multiset {
            match (mfp.apply(row), &mut applied) {
                (Ok(Some(out)), Ok(rows)) => rows.push((out, *diff)),
                (Ok(None), _) | (_, Err(_)) => {}
                (Err(error), applied) => *applied = Err(error),
            }
        }
        let applied: Result<Multiset, _> = applied.map(reference::consolidate);
        prop_assert_eq!(expected.is_ok(), applied.is_ok(), "{:?} vs {:?}", expected, applied);
        if let (Ok(expected), Ok(applied)) = (expected, applied) {
            prop_assert_eq!(expected, applied);
        }
    }

    #[test]
    fn the_reference_finishes_as_the_ir_does(
        (desc, rows, choices) in input(),
        limit in prop::option::of(0usize..8),
        offset in 0usize..4,
    ) {
        let mut choices = Choices::new(choices);
        let order_by = (0..choices.pick(3))
            .map(|_| ColumnOrder { column: choices.pick(desc.arity()), desc: choices.flip(), nulls_last: choices.flip() })
            .collect();
        let finishing = RowSetFinishing { order_by, limit, offset };
        let rows: Vec<(Row, NonZeroU64)> = reference::consolidate(rows)
            .into_iter()
            .filter_map(|(row, diff)| NonZeroU64::new(diff.max(0) as u64).map(|n| (row, n)))
            .collect();
        prop_assert_eq!(reference::finish(&finishing, rows.clone()), finishing.finish(rows));
    }
}

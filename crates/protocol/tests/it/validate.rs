//! `DataflowDescription::validate` against generated valid dataflows and generated broken ones.

use proptest::prelude::*;
use protocol::arbitrary;

proptest! {
    #[test]
    fn validate_accepts_every_generated_valid_dataflow(df in arbitrary::valid_dataflow()) {
        prop_assert_eq!(df.validate(), Ok(()));
    }

    #[test]
    fn validate_rejects_each_planted_defect_with_its_error((df, expected) in arbitrary::broken_dataflow()) {
        prop_assert_eq!(df.validate(), Err(expected));
    }
}

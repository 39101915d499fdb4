//! Identifiers: collections ([`GlobalId`]), compute instances ([`InstanceId`]), replicas ([`ReplicaId`]) and
//! peeks ([`PeekId`]). Newtypes so that one kind of id can never be passed where another is expected.
//!
//! Ids print compactly (`u7`, `s3`, `t9`, `i1`, `r2`, `peek-42`) and parse back from that form.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The id of a collection: a storage collection, a compute collection (index, materialized view,
/// subscribe, copy-to), or an object built inside a dataflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum GlobalId {
    /// A collection the system creates for itself (introspection).
    System(u64),
    /// A collection a user created.
    User(u64),
    /// A short-lived collection (a one-off peek dataflow).
    Transient(u64),
}

impl fmt::Display for GlobalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GlobalId::System(n) => write!(f, "s{n}"),
            GlobalId::User(n) => write!(f, "u{n}"),
            GlobalId::Transient(n) => write!(f, "t{n}"),
        }
    }
}

/// Why an id failed to parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} id {input:?}")]
pub struct ParseIdError {
    kind: &'static str,
    input: String,
}

impl FromStr for GlobalId {
    type Err = ParseIdError;

    /// Parses `s1`, `u1` or `t1`.
    ///
    /// # Examples
    /// ```
    /// use protocol::GlobalId;
    /// assert_eq!("u42".parse::<GlobalId>().unwrap(), GlobalId::User(42));
    /// assert_eq!(GlobalId::System(3).to_string().parse::<GlobalId>().unwrap(), GlobalId::System(3));
    /// assert!("x1".parse::<GlobalId>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseIdError { kind: "global", input: s.to_string() };
        let (prefix, number) = s.split_at_checked(1).ok_or_else(err)?;
        let n: u64 = number.parse().map_err(|_| err())?;
        match prefix {
            "s" => Ok(GlobalId::System(n)),
            "u" => Ok(GlobalId::User(n)),
            "t" => Ok(GlobalId::Transient(n)),
            _ => Err(err()),
        }
    }
}

macro_rules! numeric_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.strip_prefix($prefix)
                    .and_then(|n| n.parse().ok())
                    .map($name)
                    .ok_or_else(|| ParseIdError { kind: $kind, input: s.to_string() })
            }
        }
    };
}

numeric_id!(
    /// The id of a compute instance (a cluster).
    ///
    /// # Examples
    /// ```
    /// use protocol::InstanceId;
    /// assert_eq!(InstanceId(1).to_string(), "i1");
    /// assert_eq!("i1".parse::<InstanceId>().unwrap(), InstanceId(1));
    /// ```
    InstanceId,
    "i",
    "instance"
);
numeric_id!(
    /// The id of a replica of a compute instance.
    ///
    /// # Examples
    /// ```
    /// use protocol::ReplicaId;
    /// assert_eq!(ReplicaId(2).to_string(), "r2");
    /// assert_eq!("r2".parse::<ReplicaId>().unwrap(), ReplicaId(2));
    /// ```
    ReplicaId,
    "r",
    "replica"
);
numeric_id!(
    /// The id of a peek, chosen by the controller and unique for the controller's lifetime (the protocol
    /// calls it the peek's `uuid`).
    ///
    /// # Examples
    /// ```
    /// use protocol::PeekId;
    /// assert_eq!(PeekId(42).to_string(), "peek-42");
    /// assert_eq!("peek-42".parse::<PeekId>().unwrap(), PeekId(42));
    /// ```
    PeekId,
    "peek-",
    "peek"
);
numeric_id!(
    /// The epoch of a controller: fencing for replicas. A replica serves one controller connection at a
    /// time and lets a new one take over only if its epoch is higher than every epoch the replica has
    /// served, or equal to it from the same controller session (its reconnect). Whoever runs controllers
    /// raises the epoch whenever a controller takes over from another (see `Hello`).
    ///
    /// # Examples
    /// ```
    /// use protocol::ControllerEpoch;
    /// assert_eq!(ControllerEpoch(3).to_string(), "epoch-3");
    /// assert_eq!("epoch-3".parse::<ControllerEpoch>().unwrap(), ControllerEpoch(3));
    /// assert!(ControllerEpoch(2) < ControllerEpoch(3));
    /// ```
    ControllerEpoch,
    "epoch-",
    "controller epoch"
);

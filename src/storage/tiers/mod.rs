//! Hierarchical storage of expert state (SE-MoE): Device, Host and Disk tiers under byte budgets,
//! a hit-counting cache policy, and prefetch driven by routing with one block of look-ahead.
//!
//! [`ExpertStore`] holds one worker's expert units ([`ExpertSlot`]: parameters and AdamW moments,
//! moved as one unit). The Expert actors borrow units for their forward, backward and commit; the
//! Communicator, which sees every block's routing first, hints what to load next.

pub mod disk;
pub mod policy;
pub mod replay;
pub mod size;
pub mod store;
pub mod threads;
pub mod unit;

pub use policy::CachePolicy;
pub use size::{format_bytes, parse_bytes};
pub use store::{ExpertStore, Lease, StorageConfig, TierStats, STALL_CAUSES};
pub use unit::{ExpertSlot, Pending, UnitId};

//! Helpers shared by the compiler's integration tests.

use misaki_compiler::snapshot::{ResourceType, Snapshot};
use prost::Message;

/// Every resource of type `t` in `s`, decoded.
pub fn decode<M: Message + Default>(s: &Snapshot, t: ResourceType) -> Vec<M> {
    s.get(t)
        .items
        .values()
        .map(|r| M::decode(r.body.value.as_slice()).expect("decodes"))
        .collect()
}

//! Event upcasters (docs/architecture.md rule 7). A published event's meaning is never edited: a new
//! shape gets a new `event_version`, and an upcaster listed here turns stored older
//! versions into the current shape on load, both when an aggregate is loaded and when
//! a consumer decodes the log. Every event is at version 1.0 today, so the list is
//! empty.

use cqrs_es::persist::EventUpcaster;

/// The upcasters applied to every stored event, in order.
pub fn upcasters() -> Vec<Box<dyn EventUpcaster>> {
    Vec::new()
}

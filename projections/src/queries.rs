//! Reads of the read models, for the API. Lists are paginated by a cursor: the
//! position of the last item returned.
//!
//! Each read lives with its projection in its module of [`crate::read_models`]; this
//! module re-exports them.

pub use crate::read_models::access_log::{access_log_of_patient, AccessLogRow};
pub use crate::read_models::access_requests::{
    access_request, access_requests_of_doctor, access_requests_of_patient, requests_between,
    AccessRequestRow,
};
pub use crate::read_models::audit::{audit_events, AuditEventRow, AuditFilter};
pub use crate::read_models::directory::{
    doctor, patient_by_phone_index, patient_by_share_code, patient_by_wallet_index, DoctorRow,
};
pub use crate::read_models::doctor_grants::{
    active_grants_of_doctor, grants_due_to_expire, GrantRow,
};
pub use crate::read_models::doctor_profiles::{doctor_profile, doctor_profiles, DoctorProfileRow};
pub use crate::read_models::log_anchors::{anchors, AnchorRow};
pub use crate::read_models::patient_records::{record, records_of_patient, RecordRow};
pub use crate::read_models::payments::{
    payment, payment_by_checkout, payments_of, unsettled_payments, PaymentParty, PaymentRow,
};
pub use crate::read_models::shared::{dump_table, page, Page};
pub use crate::read_models::webhooks::{webhooks, webhooks_of, WebhookRow};

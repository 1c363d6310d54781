//! Value types, parsed once at the boundary: after it there are no raw strings for
//! phone numbers, categories, hashes or durations.

use std::collections::BTreeSet;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

pub use crate::ids::RecordId;
pub use crate::sealed::{Sealed, WrappedKey};

/// Why a raw value was refused; the message names the field and the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValueError {
    pub field: &'static str,
    pub reason: &'static str,
}

fn err(field: &'static str, reason: &'static str) -> ValueError {
    ValueError { field, reason }
}

/// The Unicode bidirectional controls (embeddings, overrides, isolates and the
/// implicit marks). They are not control characters to `char::is_control`, yet they
/// reorder what a reader sees: `cod\u{202E}fdp.exe` shows as `codexe.pdf` in a
/// download dialogue, and a name or purpose can be made to read as something else.
/// Nothing a person types into these fields needs them.
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}'
    )
}

/// The refusal of free text holding a bidirectional control.
fn no_bidi(field: &'static str, text: &str) -> Result<(), ValueError> {
    if text.chars().any(is_bidi_control) {
        Err(err(
            field,
            "must not contain bidirectional control characters",
        ))
    } else {
        Ok(())
    }
}

macro_rules! string_value {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = ValueError;
            fn try_from(s: String) -> Result<Self, ValueError> {
                Self::parse(&s)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

/// A Kenyan mobile number in the 12-digit international form M-Pesa uses:
/// `2547XXXXXXXX` or `2541XXXXXXXX`. Accepts `07…`, `01…`, `+254…` and spaces.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Msisdn(String);

impl Msisdn {
    pub fn parse(raw: &str) -> Result<Msisdn, ValueError> {
        let compact: String = raw
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .collect();
        let digits = compact.strip_prefix('+').unwrap_or(&compact);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(
                "phone",
                "must be a Kenyan mobile number such as 254712345678",
            ));
        }
        let normalised = if let Some(rest) = digits.strip_prefix('0') {
            format!("254{rest}")
        } else {
            digits.to_owned()
        };
        let valid = normalised.len() == 12
            && (normalised.starts_with("2547") || normalised.starts_with("2541"));
        if !valid {
            return Err(err(
                "phone",
                "must be a Kenyan mobile number such as 254712345678",
            ));
        }
        Ok(Msisdn(normalised))
    }
}
string_value!(Msisdn);

// Personal data: never print it.
impl std::fmt::Debug for Msisdn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msisdn(<redacted>)")
    }
}

/// A person's name: 1 to 100 characters, no control or bidirectional control
/// characters.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PersonName(String);

impl PersonName {
    pub fn parse(raw: &str) -> Result<PersonName, ValueError> {
        let name = raw.trim();
        let len = name.chars().count();
        if len == 0 {
            return Err(err("name", "must not be empty"));
        }
        if len > 100 {
            return Err(err("name", "must be at most 100 characters"));
        }
        if name.chars().any(char::is_control) {
            return Err(err("name", "must not contain control characters"));
        }
        no_bidi("name", name)?;
        Ok(PersonName(name.to_owned()))
    }
}
string_value!(PersonName);

impl std::fmt::Debug for PersonName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PersonName(<redacted>)")
    }
}

/// A birth date, `YYYY-MM-DD`, not in the future and not before 1900.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BirthDate(NaiveDate);

impl BirthDate {
    /// `today` comes from the caller's clock: the domain never reads the system time.
    pub fn parse(raw: &str, today: NaiveDate) -> Result<BirthDate, ValueError> {
        let date = NaiveDate::parse_from_str(raw.trim(), "%Y-%m-%d")
            .map_err(|_| err("birth_date", "must be a date written YYYY-MM-DD"))?;
        if date > today {
            return Err(err("birth_date", "must not be in the future"));
        }
        if date < NaiveDate::from_ymd_opt(1900, 1, 1).unwrap_or(NaiveDate::MIN) {
            return Err(err("birth_date", "must not be before 1900"));
        }
        Ok(BirthDate(date))
    }

    pub fn date(&self) -> NaiveDate {
        self.0
    }
}

impl std::fmt::Display for BirthDate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.format("%Y-%m-%d"))
    }
}

impl std::fmt::Debug for BirthDate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BirthDate(<redacted>)")
    }
}

/// A medical licence number as the registrar issues it: 2 to 32 of `A-Z 0-9 / -`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LicenceNumber(String);

impl LicenceNumber {
    pub fn parse(raw: &str) -> Result<LicenceNumber, ValueError> {
        let value = raw.trim().to_ascii_uppercase();
        let len = value.len();
        if !(2..=32).contains(&len) {
            return Err(err("license_number", "must be 2 to 32 characters"));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'/' || b == b'-')
        {
            return Err(err(
                "license_number",
                "may contain only letters, digits, / and -",
            ));
        }
        Ok(LicenceNumber(value))
    }
}
string_value!(LicenceNumber);

/// The kind of a medical record; a closed list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Lab,
    Imaging,
    Prescription,
    Diagnosis,
    Immunization,
    ClinicalNote,
    Other,
}

impl Category {
    pub const ALL: [Category; 7] = [
        Category::Lab,
        Category::Imaging,
        Category::Prescription,
        Category::Diagnosis,
        Category::Immunization,
        Category::ClinicalNote,
        Category::Other,
    ];

    /// The category's bit index on chain (the low byte of a record token id and the
    /// bit in the consent registry's category masks). Stable: never renumbered.
    pub fn chain_bit(self) -> u8 {
        match self {
            Category::Lab => 0,
            Category::Imaging => 1,
            Category::Prescription => 2,
            Category::Diagnosis => 3,
            Category::Immunization => 4,
            Category::ClinicalNote => 5,
            Category::Other => 6,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Lab => "lab",
            Category::Imaging => "imaging",
            Category::Prescription => "prescription",
            Category::Diagnosis => "diagnosis",
            Category::Immunization => "immunization",
            Category::ClinicalNote => "clinical_note",
            Category::Other => "other",
        }
    }

    pub fn parse(raw: &str) -> Result<Category, ValueError> {
        Category::ALL
            .into_iter()
            .find(|c| c.as_str() == raw.trim())
            .ok_or(err(
                "category",
                "must be one of lab, imaging, prescription, diagnosis, immunization, clinical_note, other",
            ))
    }
}

/// A media type such as `application/pdf`, lowercased, at most 127 characters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MediaType(String);

impl MediaType {
    pub fn parse(raw: &str) -> Result<MediaType, ValueError> {
        // Parameters (`; charset=…`) are not part of the type.
        let essence = raw
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
        };
        match essence.split_once('/') {
            Some((t, s)) if token(t) && token(s) && essence.len() <= 127 => Ok(MediaType(essence)),
            _ => Err(err(
                "content_type",
                "must be a media type such as application/pdf",
            )),
        }
    }
}
string_value!(MediaType);

/// A SHA-256 digest in lowercase hex.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256Hex(String);

impl Sha256Hex {
    pub fn parse(raw: &str) -> Result<Sha256Hex, ValueError> {
        if raw.len() == 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Sha256Hex(raw.to_owned()))
        } else {
            Err(err("sha256", "must be 64 lowercase hex digits"))
        }
    }
}
string_value!(Sha256Hex);

/// A size in bytes, greater than zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct ByteSize(u64);

impl ByteSize {
    pub fn new(bytes: u64) -> Result<ByteSize, ValueError> {
        if bytes == 0 {
            Err(err("size", "must not be empty"))
        } else {
            Ok(ByteSize(bytes))
        }
    }
    pub fn get(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for ByteSize {
    type Error = ValueError;
    fn try_from(v: u64) -> Result<Self, ValueError> {
        ByteSize::new(v)
    }
}

impl From<ByteSize> for u64 {
    fn from(v: ByteSize) -> u64 {
        v.0
    }
}

/// Why a doctor asks for access: 1 to 500 characters, no control characters but line
/// breaks, no bidirectional controls. Sealed before it enters an event.
#[derive(Clone, PartialEq, Eq)]
pub struct Purpose(String);

impl Purpose {
    pub fn parse(raw: &str) -> Result<Purpose, ValueError> {
        let text = raw.trim();
        let len = text.chars().count();
        if len == 0 {
            return Err(err("purpose", "must not be empty"));
        }
        if len > 500 {
            return Err(err("purpose", "must be at most 500 characters"));
        }
        if text.chars().any(|c| c.is_control() && c != '\n') {
            return Err(err("purpose", "must not contain control characters"));
        }
        no_bidi("purpose", text)?;
        Ok(Purpose(text.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Purpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Purpose(<redacted>)")
    }
}

/// A password as typed at sign-up or sign-in: 10 to 128 characters. It is only ever
/// hashed (Argon2id); it has no serialized form and never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn parse(raw: &str) -> Result<Password, ValueError> {
        let len = raw.chars().count();
        if len < 10 {
            return Err(err("password", "must be at least 10 characters"));
        }
        if len > 128 {
            return Err(err("password", "must be at most 128 characters"));
        }
        Ok(Password(raw.to_owned()))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// A record's original file name: 1 to 255 characters, no path separators, control or
/// bidirectional control characters (it reaches `Content-Disposition`). Sealed before
/// it enters an event.
#[derive(Clone, PartialEq, Eq)]
pub struct Filename(String);

impl Filename {
    pub fn parse(raw: &str) -> Result<Filename, ValueError> {
        let name = raw.trim();
        let len = name.chars().count();
        if len == 0 {
            return Err(err("filename", "must not be empty"));
        }
        if len > 255 {
            return Err(err("filename", "must be at most 255 characters"));
        }
        if name
            .chars()
            .any(|c| c.is_control() || c == '/' || c == '\\')
        {
            return Err(err(
                "filename",
                "must not contain path separators or control characters",
            ));
        }
        no_bidi("filename", name)?;
        Ok(Filename(name.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Filename {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Filename(<redacted>)")
    }
}

/// Free text a person adds (a note to a request, a reason for a rejection): 1 to 1000
/// characters, no control characters but line breaks, no bidirectional controls.
/// Sealed before it enters an event.
#[derive(Clone, PartialEq, Eq)]
pub struct Note(String);

impl Note {
    /// `field` names the request field the text came from, for the error.
    pub fn parse(field: &'static str, raw: &str) -> Result<Note, ValueError> {
        let text = raw.trim();
        let len = text.chars().count();
        if len == 0 {
            return Err(err(field, "must not be empty when given"));
        }
        if len > 1000 {
            return Err(err(field, "must be at most 1000 characters"));
        }
        if text.chars().any(|c| c.is_control() && c != '\n') {
            return Err(err(field, "must not contain control characters"));
        }
        no_bidi(field, text)?;
        Ok(Note(text.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Note(<redacted>)")
    }
}

/// What an operator-created staff member does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StaffRole {
    Registrar,
    Auditor,
}

impl StaffRole {
    pub fn as_str(self) -> &'static str {
        match self {
            StaffRole::Registrar => "registrar",
            StaffRole::Auditor => "auditor",
        }
    }

    pub fn parse(raw: &str) -> Result<StaffRole, ValueError> {
        match raw.trim() {
            "registrar" => Ok(StaffRole::Registrar),
            "auditor" => Ok(StaffRole::Auditor),
            _ => Err(err("role", "must be registrar or auditor")),
        }
    }
}

/// How long access is requested for: 1 to 365 days.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct DurationDays(u16);

impl DurationDays {
    pub fn new(days: i64) -> Result<DurationDays, ValueError> {
        if (1..=365).contains(&days) {
            Ok(DurationDays(days as u16))
        } else {
            Err(err("duration_days", "must be between 1 and 365"))
        }
    }
    pub fn days(self) -> u16 {
        self.0
    }
    pub fn as_duration(self) -> chrono::Duration {
        chrono::Duration::days(i64::from(self.0))
    }
}

impl TryFrom<u16> for DurationDays {
    type Error = ValueError;
    fn try_from(v: u16) -> Result<Self, ValueError> {
        DurationDays::new(i64::from(v))
    }
}

impl From<DurationDays> for u16 {
    fn from(v: DurationDays) -> u16 {
        v.0
    }
}

/// What a request or grant covers: whole categories and/or individual records.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    pub categories: BTreeSet<Category>,
    pub record_ids: BTreeSet<RecordId>,
}

impl Scope {
    /// A scope that covers something.
    pub fn new(
        categories: BTreeSet<Category>,
        record_ids: BTreeSet<RecordId>,
    ) -> Result<Scope, ValueError> {
        let scope = Scope {
            categories,
            record_ids,
        };
        if scope.is_empty() {
            Err(err(
                "categories",
                "must name at least one category or record",
            ))
        } else {
            Ok(scope)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.categories.is_empty() && self.record_ids.is_empty()
    }

    pub fn covers(&self, category: Category, record_id: RecordId) -> bool {
        self.categories.contains(&category) || self.record_ids.contains(&record_id)
    }

    pub fn is_subset_of(&self, other: &Scope) -> bool {
        self.categories.is_subset(&other.categories) && self.record_ids.is_subset(&other.record_ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msisdn_accepts_kenyan_mobile_forms_and_normalises_them() {
        for raw in [
            "254712345678",
            "0712345678",
            "+254712345678",
            "0712 345 678",
            "254112345678",
            "0112345678",
        ] {
            let m = Msisdn::parse(raw).unwrap();
            assert!(
                m.as_str().len() == 12 && m.as_str().starts_with("254"),
                "{raw}"
            );
        }
        assert_eq!(
            Msisdn::parse("0712345678").unwrap().as_str(),
            "254712345678"
        );
    }

    #[test]
    fn msisdn_refuses_other_numbers() {
        for raw in [
            "",
            "12345",
            "254212345678",
            "25471234567",
            "2547123456789",
            "07123abc78",
            "+1 202 555 0100",
        ] {
            assert_eq!(Msisdn::parse(raw).unwrap_err().field, "phone", "{raw}");
        }
    }

    #[test]
    fn personal_values_never_print_their_content() {
        let phone = Msisdn::parse("254712345678").unwrap();
        let name = PersonName::parse("Achieng Otieno").unwrap();
        let all = format!(
            "{phone:?}{name:?}{:?}",
            Purpose::parse("HIV follow-up").unwrap()
        );
        assert!(!all.contains("2547") && !all.contains("Achieng") && !all.contains("HIV"));
    }

    #[test]
    fn a_birth_date_in_the_future_is_refused() {
        let today = NaiveDate::from_ymd_opt(2026, 11, 24).unwrap();
        assert!(BirthDate::parse("2026-11-24", today).is_ok());
        assert_eq!(
            BirthDate::parse("2026-11-25", today).unwrap_err().reason,
            "must not be in the future"
        );
        assert!(BirthDate::parse("24/11/1990", today).is_err());
    }

    #[test]
    fn categories_are_a_closed_list() {
        for c in Category::ALL {
            assert_eq!(Category::parse(c.as_str()), Ok(c));
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
        assert!(Category::parse("xray").is_err());
        assert!(serde_json::from_str::<Category>("\"xray\"").is_err());
    }

    #[test]
    fn other_values_parse_and_refuse() {
        assert_eq!(
            LicenceNumber::parse(" kmpdc/12-34 ").unwrap().as_str(),
            "KMPDC/12-34"
        );
        assert!(LicenceNumber::parse("a").is_err());
        assert!(LicenceNumber::parse("AB 12").is_err());
        assert_eq!(
            MediaType::parse("Application/PDF; charset=x")
                .unwrap()
                .as_str(),
            "application/pdf"
        );
        assert!(MediaType::parse("pdf").is_err());
        assert!(Sha256Hex::parse(&"a".repeat(64)).is_ok());
        assert!(Sha256Hex::parse(&"A".repeat(64)).is_err());
        assert!(ByteSize::new(0).is_err());
        assert!(DurationDays::new(0).is_err() && DurationDays::new(366).is_err());
        assert_eq!(DurationDays::new(30).unwrap().days(), 30);
        assert!(Purpose::parse(&"x".repeat(501)).is_err());
        assert!(Scope::new(BTreeSet::new(), BTreeSet::new()).is_err());
        // Stored values are validated on load too.
        assert!(serde_json::from_str::<Msisdn>("\"12\"").is_err());
        assert!(serde_json::from_str::<DurationDays>("0").is_err());
    }

    #[test]
    fn passwords_filenames_and_notes_parse_and_never_print() {
        assert!(Password::parse("short").is_err());
        assert!(Password::parse(&"x".repeat(129)).is_err());
        let p = Password::parse("correct horse battery").unwrap();
        assert_eq!(p.expose(), "correct horse battery");
        assert!(!format!("{p:?}").contains("horse"));
        assert_eq!(
            Filename::parse(" lab-result.pdf ").unwrap().as_str(),
            "lab-result.pdf"
        );
        for bad in ["", "../etc/passwd", "a\\b", "a\u{0}b"] {
            assert_eq!(Filename::parse(bad).unwrap_err().field, "filename", "{bad}");
        }
        assert!(!format!("{:?}", Filename::parse("hiv.pdf").unwrap()).contains("hiv"));
        assert_eq!(Note::parse("reason", "").unwrap_err().field, "reason");
        assert!(Note::parse("note", &"n".repeat(1001)).is_err());
        assert_eq!(StaffRole::parse("auditor"), Ok(StaffRole::Auditor));
        assert_eq!(StaffRole::parse("admin").unwrap_err().field, "role");
    }

    #[test]
    fn free_text_refuses_every_bidirectional_control() {
        let bidi: Vec<char> = ('\u{202A}'..='\u{202E}')
            .chain('\u{2066}'..='\u{2069}')
            .chain(['\u{200E}', '\u{200F}', '\u{061C}'])
            .collect();
        assert_eq!(bidi.len(), 12);
        for c in bidi {
            let text = format!("Achieng{c}Otieno");
            let names = [
                PersonName::parse(&text).map(|_| ()),
                Purpose::parse(&text).map(|_| ()),
                Filename::parse(&format!("cod{c}fdp.exe")).map(|_| ()),
                Note::parse("note", &text).map(|_| ()),
                Note::parse("reason", &text).map(|_| ()),
            ];
            let fields: Vec<&str> = names.iter().map(|r| r.clone().unwrap_err().field).collect();
            assert_eq!(
                fields,
                ["name", "purpose", "filename", "note", "reason"],
                "U+{:04X}",
                c as u32
            );
            for r in names {
                assert_eq!(
                    r.unwrap_err().reason,
                    "must not contain bidirectional control characters"
                );
            }
        }
        // Right-to-left text itself is welcome: only the invisible controls are refused.
        assert!(PersonName::parse("أمينة حسن").is_ok());
        assert!(Filename::parse("תוצאות.pdf").is_ok());
        assert!(Purpose::parse("Ufuatiliaji wa kisukari\nna shinikizo").is_ok());
        // The zero-width joiner is not a bidirectional control (it shapes scripts).
        assert!(PersonName::parse("Dr\u{200D}Kamau").is_ok());
    }

    #[test]
    fn scopes_cover_categories_or_records_and_compare() {
        let r = RecordId::new();
        let lab = Scope::new([Category::Lab].into(), BTreeSet::new()).unwrap();
        let lab_imaging =
            Scope::new([Category::Lab, Category::Imaging].into(), BTreeSet::new()).unwrap();
        assert!(lab.covers(Category::Lab, r));
        assert!(!lab.covers(Category::Imaging, r));
        assert!(Scope::new(BTreeSet::new(), [r].into())
            .unwrap()
            .covers(Category::Imaging, r));
        assert!(lab.is_subset_of(&lab_imaging));
        assert!(!lab_imaging.is_subset_of(&lab));
    }
}

//! Per-hub JSON Schema validation: which bodies are checked, the compiled schemas (loaded at start, swapped
//! whole on reload), and a violation report bounded in size.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use jsonschema::{Draft, Retrieve, Uri, Validator};
use parking_lot::RwLock;

use eventhub_telemetry::metrics::SchemaValidations;

/// The most violations a refusal lists (each as a `BadRequest` field violation).
pub const MAX_LISTED: usize = 5;

/// The most violations a refusal counts (its `violations` metadata says `100+` beyond): counting stops there.
pub const MAX_COUNTED: usize = 100;

/// The most bytes of one violation's description (it may quote the event's values).
pub const DESCRIPTION_MAX: usize = 256;

/// Why a schema cannot be used; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The file cannot be read.
    #[error("schemas.{hub}: cannot read {}: {source}", path.display())]
    Unreadable {
        /// The hub it is for.
        hub: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("schemas.{hub}: {} is not JSON: {source}", path.display())]
    NotJson {
        /// The hub it is for.
        hub: String,
        /// The file.
        path: PathBuf,
        /// Where it breaks.
        source: serde_json::Error,
    },
    /// Its `$schema` names a draft the gateway does not take.
    #[error(
        "schemas.{hub}: {}: $schema {uri:?} is not supported: use draft 2020-12 \
         (https://json-schema.org/draft/2020-12/schema, the default) or draft-07 \
         (http://json-schema.org/draft-07/schema#)",
        path.display()
    )]
    UnsupportedDraft {
        /// The hub it is for.
        hub: String,
        /// The file.
        path: PathBuf,
        /// The `$schema` value.
        uri: String,
    },
    /// The validator refused it: not a valid schema of its draft, a bad regex, a `$ref` it cannot resolve
    /// (remote and file references are never fetched).
    #[error("schemas.{hub}: {} is not a usable schema: {detail}", path.display())]
    Invalid {
        /// The hub it is for.
        hub: String,
        /// The file.
        path: PathBuf,
        /// The validator's words, with the schema location.
        detail: String,
    },
}

/// One hub's compiled schema, as one event is checked against it.
pub struct Compiled {
    validator: Validator,
    /// `2020-12` or `07`.
    draft: &'static str,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("draft", &self.draft)
            .finish_non_exhaustive()
    }
}

/// One violation: where in the body (a JSON Pointer, RFC 6901; `""` is the whole body) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The instance location.
    pub pointer: String,
    /// What is wrong, at most [`DESCRIPTION_MAX`] bytes.
    pub description: String,
}

/// Why a body was refused: the first [`MAX_LISTED`] violations and how many were found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violations {
    /// The first violations, in the validator's order.
    pub listed: Vec<Violation>,
    /// How many were found, at most [`MAX_COUNTED`].
    pub found: usize,
    /// Whether counting stopped at [`MAX_COUNTED`].
    pub more: bool,
}

impl Violations {
    /// `found`, with `+` when counting stopped.
    pub fn count_label(&self) -> String {
        if self.more {
            format!("{}+", self.found)
        } else {
            self.found.to_string()
        }
    }

    fn single(pointer: &str, description: String) -> Self {
        Self {
            listed: vec![Violation {
                pointer: pointer.to_owned(),
                description: clip(description),
            }],
            found: 1,
            more: false,
        }
    }
}

/// Whether an event's body is checked: a `json` body kind, or a content type whose media type is
/// `application/json` (any case, parameters ignored). `+json` suffixes are not: their documents are often
/// envelopes (`application/cloudevents+json`) rather than the data a hub's schema describes.
pub fn applies(json_kind: bool, content_type: Option<&str>) -> bool {
    json_kind
        || content_type.is_some_and(|value| {
            value
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
}

impl Compiled {
    /// Compiles `schema` (the text of `path`, for `hub`): its `$schema` picks the draft, 2020-12 without one.
    pub fn compile(hub: &str, path: &Path, text: &[u8]) -> Result<Self, SchemaError> {
        let schema: serde_json::Value =
            serde_json::from_slice(text).map_err(|source| SchemaError::NotJson {
                hub: hub.to_owned(),
                path: path.to_owned(),
                source,
            })?;
        let declared = schema
            .as_object()
            .and_then(|object| object.get("$schema"))
            .map(|uri| {
                uri.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| uri.to_string())
            });
        let (draft, name) = match declared.as_deref().map(Draft::from_schema_uri) {
            None => (Draft::Draft202012, "2020-12"),
            Some(Draft::Draft202012) => (Draft::Draft202012, "2020-12"),
            Some(Draft::Draft7) => (Draft::Draft7, "07"),
            Some(_) => {
                return Err(SchemaError::UnsupportedDraft {
                    hub: hub.to_owned(),
                    path: path.to_owned(),
                    uri: declared.unwrap_or_default(),
                });
            }
        };
        let validator = jsonschema::options()
            .with_draft(draft)
            .with_base_uri(file_uri(path))
            .with_retriever(NoRetrieval)
            .build(&schema)
            .map_err(|error| SchemaError::Invalid {
                hub: hub.to_owned(),
                path: path.to_owned(),
                detail: describe_compile_error(&error),
            })?;
        Ok(Self {
            validator,
            draft: name,
        })
    }

    /// The draft, `2020-12` or `07`.
    pub fn draft(&self) -> &'static str {
        self.draft
    }

    /// Checks one body: `Ok` when it is JSON and valid. Its cost is bounded by the body's size (the request's
    /// size limit) and the schema's: a valid body is checked without building any error.
    pub fn check(&self, body: &[u8]) -> Result<(), Violations> {
        let instance: serde_json::Value = serde_json::from_slice(body).map_err(|error| {
            Violations::single(
                "",
                format!("the body is not JSON although its content type says so: {error}"),
            )
        })?;
        if self.validator.is_valid(&instance) {
            return Ok(());
        }
        let mut listed = Vec::with_capacity(MAX_LISTED);
        let mut found = 0;
        let mut more = false;
        for error in self.validator.iter_errors(&instance) {
            if found == MAX_COUNTED {
                more = true;
                break;
            }
            found += 1;
            if listed.len() < MAX_LISTED {
                listed.push(Violation {
                    pointer: error.instance_path().to_string(),
                    description: clip(error.to_string()),
                });
            }
        }
        // is_valid and iter_errors agree; should they not, the refusal still says something.
        if listed.is_empty() {
            return Err(Violations::single(
                "",
                "the body does not match the schema".into(),
            ));
        }
        Err(Violations {
            listed,
            found,
            more,
        })
    }
}

fn describe_compile_error(error: &jsonschema::ValidationError<'_>) -> String {
    let location = error.schema_path().to_string();
    let text = clip_to(error.to_string(), 1024);
    if location.is_empty() {
        text
    } else {
        format!("{text} (at schema location {location})")
    }
}

/// The file's `file://` URI: the base of relative `$ref`s (which are then refused by name, not for lack of a
/// base), unless the schema's `$id` gives another.
fn file_uri(path: &Path) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let text = absolute.to_string_lossy();
    let encoded = percent_encoding::utf8_percent_encode(&text, PATH_UNSAFE);
    format!("file://{encoded}")
}

/// What a path keeps out of a URI: controls, space and the characters URIs give a meaning to (`/` stays).
const PATH_UNSAFE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b']')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Refuses every `$ref` outside the schema file: the gateway fetches nothing at start or reload.
struct NoRetrieval;

impl Retrieve for NoRetrieval {
    fn retrieve(
        &self,
        uri: &Uri<String>,
    ) -> Result<serde_json::Value, Box<dyn std::error::Error + Send + Sync>> {
        Err(format!(
            "$ref {uri} is outside the schema file: remote and file references are not fetched \
             (put the definitions in the file, under $defs)"
        )
        .into())
    }
}

fn clip(text: String) -> String {
    clip_to(text, DESCRIPTION_MAX)
}

fn clip_to(text: String, max: usize) -> String {
    match super::status::clip_to(&text, max) {
        std::borrow::Cow::Borrowed(_) => text,
        std::borrow::Cow::Owned(clipped) => clipped,
    }
}

/// One hub's schema file and what was last compiled from it.
struct HubSchema {
    hub: String,
    path: PathBuf,
    current: RwLock<Arc<Compiled>>,
    /// Resolved at the first event, after the recorder is installed (handles resolved before it are no-ops).
    counters: OnceLock<SchemaValidations>,
}

/// The schemas of the hubs that have one; empty when none is configured (then nothing is checked).
#[derive(Default)]
pub struct Schemas {
    hubs: Vec<HubSchema>,
}

impl std::fmt::Debug for Schemas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.hubs.iter().map(|hub| (&hub.hub, &hub.path)))
            .finish()
    }
}

/// A hub's schema as one event uses it: kept for the whole check even if a reload swaps it meanwhile.
pub struct InUse<'a> {
    /// The compiled schema.
    pub compiled: Arc<Compiled>,
    counters: &'a SchemaValidations,
}

impl InUse<'_> {
    /// Checks `body` and counts the outcome.
    pub fn check(&self, body: &[u8]) -> Result<(), Violations> {
        let checked = self.compiled.check(body);
        match &checked {
            Ok(()) => self.counters.valid(),
            Err(_) => self.counters.invalid(),
        }
        checked
    }
}

impl Schemas {
    /// Reads and compiles every file of `files` (hub -> schema file); the first that fails stops it.
    pub fn load(files: &BTreeMap<String, PathBuf>) -> Result<Self, SchemaError> {
        let hubs = files
            .iter()
            .map(|(hub, path)| {
                Ok(HubSchema {
                    hub: hub.clone(),
                    path: path.clone(),
                    current: RwLock::new(Arc::new(read_and_compile(hub, path)?)),
                    counters: OnceLock::new(),
                })
            })
            .collect::<Result<_, SchemaError>>()?;
        Ok(Self { hubs })
    }

    /// Whether no hub has a schema.
    pub fn is_empty(&self) -> bool {
        self.hubs.is_empty()
    }

    /// One line per hub with a schema: `<hub>: <file> (draft <draft>)`, for `--check-config`.
    pub fn describe(&self) -> Vec<String> {
        self.hubs
            .iter()
            .map(|entry| {
                format!(
                    "{}: {} (draft {})",
                    entry.hub,
                    entry.path.display(),
                    entry.current.read().draft()
                )
            })
            .collect()
    }

    /// `hub`'s schema now, if it has one.
    pub fn for_hub(&self, hub: &str) -> Option<InUse<'_>> {
        let entry = self.hubs.iter().find(|entry| entry.hub == hub)?;
        Some(InUse {
            compiled: Arc::clone(&entry.current.read()),
            counters: entry
                .counters
                .get_or_init(|| SchemaValidations::new(&entry.hub)),
        })
    }

    /// Reads and compiles every file again; swaps them in only if all compile, else keeps every current one
    /// and names the first file that failed. Events being checked keep the schema they started with.
    pub fn reload(&self) -> Result<usize, SchemaError> {
        let fresh = self
            .hubs
            .iter()
            .map(|entry| read_and_compile(&entry.hub, &entry.path).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        for (entry, compiled) in self.hubs.iter().zip(fresh) {
            *entry.current.write() = compiled;
        }
        Ok(self.hubs.len())
    }
}

fn read_and_compile(hub: &str, path: &Path) -> Result<Compiled, SchemaError> {
    let text = std::fs::read(path).map_err(|source| SchemaError::Unreadable {
        hub: hub.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    Compiled::compile(hub, path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compiled(schema: serde_json::Value) -> Result<Compiled, SchemaError> {
        Compiled::compile(
            "eh1",
            Path::new("/schemas/eh1.json"),
            schema.to_string().as_bytes(),
        )
    }

    fn order_schema() -> serde_json::Value {
        json!({
            "type": "object",
            "required": ["id", "items"],
            "properties": {
                "id": {"type": "integer"},
                "items": {"type": "array", "items": {"$ref": "#/$defs/item"}}
            },
            "$defs": {"item": {"type": "object", "properties": {"price": {"type": "number", "minimum": 0}}}}
        })
    }

    #[test]
    fn only_json_bodies_are_checked() {
        assert!(applies(true, Some("text/plain")));
        assert!(applies(false, Some("application/json")));
        assert!(applies(false, Some("Application/JSON; charset=utf-8")));
        assert!(!applies(false, Some("application/cloudevents+json")));
        assert!(!applies(false, Some("text/plain")));
        assert!(!applies(false, None));
    }

    #[test]
    fn a_valid_body_passes_and_violations_name_their_json_pointers() {
        let schema = compiled(order_schema()).unwrap();
        assert_eq!(schema.draft(), "2020-12");
        assert!(schema.check(br#"{"id":1,"items":[{"price":2}]}"#).is_ok());
        let refused = schema
            .check(br#"{"id":"x","items":[{"price":1},{"price":-1}]}"#)
            .unwrap_err();
        let pointers: Vec<&str> = refused.listed.iter().map(|v| v.pointer.as_str()).collect();
        assert!(pointers.contains(&"/id"), "{pointers:?}");
        assert!(pointers.contains(&"/items/1/price"), "{pointers:?}");
        assert_eq!(refused.found, 2);
        let missing = schema.check(b"{}").unwrap_err();
        assert_eq!(missing.listed[0].pointer, "");
        assert!(missing.listed[0].description.contains("id"), "{missing:?}");
    }

    #[test]
    fn a_body_that_is_not_json_is_refused_at_the_root() {
        let schema = compiled(order_schema()).unwrap();
        let refused = schema.check(b"not json").unwrap_err();
        assert_eq!(refused.listed[0].pointer, "");
        assert!(
            refused.listed[0].description.contains("is not JSON"),
            "{refused:?}"
        );
    }

    #[test]
    fn violations_are_bounded_in_number_and_size() {
        let schema = compiled(json!({"type": "array", "items": {"type": "string"}})).unwrap();
        let body = serde_json::to_vec(&vec![1; 1000]).unwrap();
        let refused = schema.check(&body).unwrap_err();
        assert_eq!(refused.listed.len(), MAX_LISTED);
        assert_eq!(refused.found, MAX_COUNTED);
        assert!(refused.more);
        assert_eq!(refused.count_label(), "100+");
        let schema = compiled(json!({"type": "integer"})).unwrap();
        let long = serde_json::to_vec(&"x".repeat(100_000)).unwrap();
        let refused = schema.check(&long).unwrap_err();
        assert!(
            refused.listed[0].description.len() < DESCRIPTION_MAX + 40,
            "{}",
            refused.listed[0].description.len()
        );
    }

    #[test]
    fn draft_07_is_taken_by_its_schema_uri() {
        let schema = compiled(json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {"n": {"type": "integer"}},
            "dependencies": {"a": ["b"]},
            "definitions": {}
        }))
        .unwrap();
        assert_eq!(schema.draft(), "07");
        assert!(schema.check(br#"{"n":1}"#).is_ok());
        let refused = schema.check(br#"{"a":1}"#).unwrap_err();
        assert!(refused.listed[0].description.contains('b'), "{refused:?}");
    }

    #[test]
    fn unusable_schemas_are_refused_naming_the_file() {
        let cases = [
            (json!({"type": 12}), "is not a usable schema"),
            (
                json!({"$ref": "https://example.com/other.json"}),
                "outside the schema file",
            ),
            (json!({"$ref": "other.json"}), "outside the schema file"),
            (json!({"pattern": "(unclosed"}), "is not a usable schema"),
            (
                json!({"$schema": "http://json-schema.org/draft-04/schema#"}),
                "is not supported",
            ),
        ];
        for (schema, expected) in cases {
            let error = compiled(schema.clone()).unwrap_err().to_string();
            assert!(error.contains("/schemas/eh1.json"), "{schema}: {error}");
            assert!(error.starts_with("schemas.eh1: "), "{schema}: {error}");
            assert!(error.contains(expected), "{schema}: {error}");
        }
        let error = Compiled::compile("eh1", Path::new("/s.json"), b"{")
            .unwrap_err()
            .to_string();
        assert!(error.contains("/s.json is not JSON"), "{error}");
    }

    #[test]
    fn a_reload_swaps_every_schema_or_keeps_them_all() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("a.json");
        let second = dir.path().join("b.json");
        std::fs::write(&first, r#"{"type":"object"}"#).unwrap();
        std::fs::write(&second, r#"{"type":"object"}"#).unwrap();
        let files = BTreeMap::from([
            ("a".to_owned(), first.clone()),
            ("b".to_owned(), second.clone()),
        ]);
        let schemas = Schemas::load(&files).unwrap();
        assert_eq!(
            schemas.describe(),
            [
                format!("a: {} (draft 2020-12)", first.display()),
                format!("b: {} (draft 2020-12)", second.display())
            ]
        );
        assert!(schemas.for_hub("none").is_none());
        let before = schemas.for_hub("a").unwrap();
        assert!(before.check(b"{}").is_ok());
        // One good file and one bad: nothing changes, and the error names the bad one.
        std::fs::write(&first, r#"{"type":"array"}"#).unwrap();
        std::fs::write(&second, r#"{"type": 5}"#).unwrap();
        let error = schemas.reload().unwrap_err().to_string();
        assert!(error.contains("b.json"), "{error}");
        assert!(schemas.for_hub("a").unwrap().check(b"{}").is_ok());
        // Both good: both swapped; an event that took the old one keeps it.
        std::fs::write(&second, r#"{"type":"array"}"#).unwrap();
        assert_eq!(schemas.reload().unwrap(), 2);
        assert!(schemas.for_hub("a").unwrap().check(b"{}").is_err());
        assert!(schemas.for_hub("b").unwrap().check(b"[]").is_ok());
        assert!(before.check(b"{}").is_ok());
        // A file gone is a failed reload too.
        std::fs::remove_file(&first).unwrap();
        let error = schemas.reload().unwrap_err().to_string();
        assert!(
            error.contains("cannot read") && error.contains("a.json"),
            "{error}"
        );
        assert!(schemas.for_hub("a").unwrap().check(b"[]").is_ok());
    }

    #[test]
    fn a_bad_file_stops_the_load_naming_it() {
        let files = BTreeMap::from([("eh1".to_owned(), PathBuf::from("/nonexistent/eh1.json"))]);
        let error = Schemas::load(&files).unwrap_err().to_string();
        assert!(
            error.starts_with("schemas.eh1: cannot read /nonexistent/eh1.json"),
            "{error}"
        );
    }
}

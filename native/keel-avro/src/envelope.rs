//! Envelopes built from decoded records and from requests' JSON without a second validation,
//! when every rule of the envelope model holds.
//!
//! Why: the processor decodes every command, and pydantic spent 5–7 µs building each decoded
//! envelope (four models, three of its validators calling back into Python) where the Avro
//! schema's types already hold most of what it checks; the gateway spent as much on each
//! request's. `EnvelopeBuilder.build` checks every rule (the identifier pattern, the length
//! limits, the version bounds, the key sets, a UTC timestamp, the payload's class matching
//! `type`) on the values those two sources give: a decoded record's (`uuid.UUID`s, every key)
//! and a request's (ids as canonical UUID text, omitted fields taking the models' defaults).
//! It returns `None` at the first rule it cannot confirm, so the caller hands the mapping to
//! pydantic, which accepts it or names the error: what callers see never depends on which path
//! ran. The models' fields, defaults and rules are pinned on the Python side
//! (`keel.contracts.codec`), which uses the builder only while they are the ones this file
//! implements.

use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDateTime, PyDict, PyInt, PyList, PySet, PyString, PyTuple, PyType, PyTzInfo, PyTzInfoAccess};

/// The identifier rule (tenant, aggregate and actor ids) this file implements.
pub const ID_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$";
const ON_BEHALF_OF_MAX: isize = 200;
const TRACEPARENT_MAX: isize = 128;
const REASON_MAX: isize = 1000;

const ENVELOPE_FIELDS: [&str; 16] = [
    "id", "tenant_id", "actor", "delegation", "on_behalf_of", "authority", "type", "schema_version",
    "aggregate_id", "expected_version", "version", "causation_id", "correlation_id", "occurred_at",
    "traceparent", "payload",
];
const ACTOR_FIELDS: [&str; 2] = ["kind", "id"];
const LINK_FIELDS: [&str; 2] = ["actor", "reason"];
const AUTHORITY_FIELDS: [&str; 5] = ["role", "grant", "policy_rule", "policy_version", "approval_id"];
const DELEGATION: usize = 3; // positions in ENVELOPE_FIELDS
const AUTHORITY: usize = 5;

/// A rule the builder cannot confirm: pydantic decides.
struct Skip;

impl<E: Into<PyErr>> From<E> for Skip {
    fn from(_: E) -> Self {
        Skip
    }
}

type Checked<T> = Result<T, Skip>;

/// A model class, its field names in the model's order, and each field's default (`None`: required).
struct Model {
    class: Py<PyType>,
    fields: Vec<Py<PyString>>,
    defaults: Vec<Option<Py<PyAny>>>,
    fields_set: Py<PySet>,
}

/// A model's field values in order, and the names of those given (`None`: all of them).
struct Values<'py> {
    values: Vec<Bound<'py, PyAny>>,
    given: Option<Bound<'py, PySet>>,
}

impl Model {
    /// `given`: the model's fields (`model_fields`' names) with their defaults, `required` for none.
    fn new(py: Python<'_>, class: Bound<'_, PyType>, names: &[&str], given: &Bound<'_, PyDict>,
           required: &Bound<'_, PyAny>) -> PyResult<Self> {
        let given_names: Vec<String> = given.keys().extract()?;
        if given_names != names {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "{} has the fields {given_names:?}; the builder knows {names:?}", class.name()?)));
        }
        let fields: Vec<Py<PyString>> = names.iter().map(|n| PyString::intern(py, n).unbind()).collect();
        let defaults = given.values().iter().map(|d| if d.is(required) { None } else { Some(d.unbind()) }).collect();
        let fields_set = PySet::new(py, fields.iter().map(|n| n.bind(py)))?.unbind();
        Ok(Model { class: class.unbind(), fields, defaults, fields_set })
    }

    fn name<'py>(&self, py: Python<'py>, index: usize) -> &Bound<'py, PyString> {
        self.fields[index].bind(py)
    }

    /// Whether `value` is the default of the field at `index` itself (what `values` gives for it when omitted).
    fn is_default(&self, py: Python<'_>, index: usize, value: &Bound<'_, PyAny>) -> bool {
        self.defaults[index].as_ref().is_some_and(|default| value.is(default.bind(py)))
    }

    /// The values of `dict` for the model's fields, in order, a default for each one omitted;
    /// `Skip` when a required field is missing or a key is no field.
    fn values<'py>(&self, py: Python<'py>, dict: &Bound<'py, PyDict>) -> Checked<Values<'py>> {
        let mut values = Vec::with_capacity(self.fields.len());
        let mut given = Vec::with_capacity(self.fields.len());
        for (index, default) in self.defaults.iter().enumerate() {
            let name = self.name(py, index);
            match dict.get_item(name)? {
                Some(value) => {
                    values.push(value);
                    given.push(name);
                }
                None => values.push(default.as_ref().ok_or(Skip)?.bind(py).clone()),
            }
        }
        if given.len() != dict.len() {
            return Err(Skip);
        }
        let given = if given.len() == self.fields.len() { None } else { Some(PySet::new(py, given)?) };
        Ok(Values { values, given })
    }

    /// An instance holding `values` (in field order), as pydantic's validation leaves one:
    /// `__dict__`, the given fields in `__pydantic_fields_set__`, no extra, no private attributes.
    fn instance<'py>(&self, py: Python<'py>, values: Values<'py>) -> PyResult<Bound<'py, PyAny>> {
        let dict = PyDict::new(py);
        for (name, value) in self.fields.iter().zip(&values.values) {
            dict.set_item(name.bind(py), value)?;
        }
        let fields_set = match values.given {
            Some(given) => given.into_any(),
            // SAFETY: a live set; `PySet_New` copies it (hashes kept) or returns NULL with an exception set.
            None => unsafe { Bound::from_owned_ptr_or_err(py, ffi::PySet_New(self.fields_set.as_ptr()))? },
        };
        let none = py.None().into_bound(py);
        // As `object.__setattr__`: a frozen model's own `__setattr__` refuses every write.
        crate::objects::instance(self.class.bind(py), &[
            (intern!(py, "__dict__"), dict.as_any()),
            (intern!(py, "__pydantic_fields_set__"), &fields_set),
            (intern!(py, "__pydantic_extra__"), &none),
            (intern!(py, "__pydantic_private__"), &none),
        ])
    }
}

/// Builds `keel.domain.envelope.Envelope`s from records `keel_avro.Plan.decode` read and from
/// the mappings the gateway makes of requests.
#[pyclass(frozen, module = "keel_avro")]
pub struct EnvelopeBuilder {
    envelope: Model,
    actor: Model,
    link: Model,
    authority: Model,
    kinds: Py<PyDict>,
    uuid_type: Py<PyType>,
    uuid_safe_unknown: Py<PyAny>,
    utc: Py<PyTzInfo>,
}

#[pymethods]
impl EnvelopeBuilder {
    /// The models' classes, each with its fields and their defaults (`{name: default}` in the
    /// model's order, `required` for a field without one), and the actor kinds by value; raises
    /// `ValueError` when the fields are not the ones built here.
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(py: Python<'_>, envelope: Bound<'_, PyType>, envelope_fields: Bound<'_, PyDict>,
           actor: Bound<'_, PyType>, actor_fields: Bound<'_, PyDict>,
           link: Bound<'_, PyType>, link_fields: Bound<'_, PyDict>,
           authority: Bound<'_, PyType>, authority_fields: Bound<'_, PyDict>,
           kinds: Bound<'_, PyDict>, required: Bound<'_, PyAny>) -> PyResult<Self> {
        let uuid = py.import("uuid")?;
        Ok(EnvelopeBuilder {
            envelope: Model::new(py, envelope, &ENVELOPE_FIELDS, &envelope_fields, &required)?,
            actor: Model::new(py, actor, &ACTOR_FIELDS, &actor_fields, &required)?,
            link: Model::new(py, link, &LINK_FIELDS, &link_fields, &required)?,
            authority: Model::new(py, authority, &AUTHORITY_FIELDS, &authority_fields, &required)?,
            kinds: kinds.unbind(),
            uuid_type: uuid.getattr("UUID")?.cast_into::<PyType>()?.unbind(),
            uuid_safe_unknown: uuid.getattr("SafeUUID")?.getattr("unknown")?.unbind(),
            utc: PyTzInfo::utc(py)?.to_owned().unbind(),
        })
    }

    /// The envelope of `record` (a decoded envelope record, or a request's mapping) carrying
    /// `payload` (its validated payload model), or `None` when a rule cannot be confirmed here.
    fn build<'py>(&self, py: Python<'py>, record: &Bound<'py, PyAny>, payload: &Bound<'py, PyAny>)
                  -> PyResult<Option<Bound<'py, PyAny>>> {
        let Ok(record) = record.cast::<PyDict>() else { return Ok(None) };
        let values = match self.envelope_values(py, record, payload) {
            Ok(values) => values,
            Err(Skip) => return Ok(None),
        };
        self.envelope.instance(py, values).map(Some)
    }
}

impl EnvelopeBuilder {
    /// The envelope's field values in order, its nested models built; `Skip` at the first rule not confirmed.
    fn envelope_values<'py>(&self, py: Python<'py>, record: &Bound<'py, PyDict>, payload: &Bound<'py, PyAny>)
                            -> Checked<Values<'py>> {
        let Values { values, given } = self.envelope.values(py, record)?;
        let [id, tenant_id, actor, delegation, on_behalf_of, authority, message_type, schema_version,
             aggregate_id, expected_version, version, causation_id, correlation_id, occurred_at,
             traceparent, given_payload] = values.as_slice() else { return Err(Skip) };
        let id = self.uuid(id)?;
        identifier(tenant_id)?;
        let actor = self.actor(py, actor)?;
        let delegation = self.delegation(py, delegation)?;
        text_at_most(on_behalf_of, ON_BEHALF_OF_MAX)?;
        let authority = self.authority(py, authority)?;
        let message_type_text = message_type.cast_exact::<PyString>()?;
        integer_at_least(schema_version, 1)?;
        identifier(aggregate_id)?;
        optional(expected_version, |v| integer_at_least(v, 0))?;
        optional(version, |v| integer_at_least(v, 1))?;
        let causation_id = if causation_id.is_none() { causation_id.clone() } else { self.uuid(causation_id)? };
        let correlation_id = self.uuid(correlation_id)?;
        self.utc_timestamp(occurred_at)?;
        text_at_most(traceparent, TRACEPARENT_MAX)?;
        if !given_payload.is(payload) || payload.get_type().name()?.to_str()? != message_type_text.to_str()? {
            return Err(Skip);
        }
        let values = vec![id, tenant_id.clone(), actor, delegation, on_behalf_of.clone(), authority,
                          message_type.clone(), schema_version.clone(), aggregate_id.clone(), expected_version.clone(),
                          version.clone(), causation_id, correlation_id, occurred_at.clone(), traceparent.clone(),
                          payload.clone()];
        Ok(Values { values, given })
    }

    fn actor<'py>(&self, py: Python<'py>, value: &Bound<'py, PyAny>) -> Checked<Bound<'py, PyAny>> {
        let Values { values, given } = self.actor.values(py, value.cast::<PyDict>()?)?;
        let [kind, id] = values.as_slice() else { return Err(Skip) };
        let kind = self.kinds.bind(py).get_item(kind.cast_exact::<PyString>()?)?.ok_or(Skip)?;
        identifier(id)?;
        Ok(self.actor.instance(py, Values { values: vec![kind, id.clone()], given })?)
    }

    /// A list of links (decoded, or a request's), or the field's default when omitted.
    fn delegation<'py>(&self, py: Python<'py>, value: &Bound<'py, PyAny>) -> Checked<Bound<'py, PyAny>> {
        if self.envelope.is_default(py, DELEGATION, value) {
            return Ok(value.clone());
        }
        let mut links = Vec::new();
        for link in value.cast_exact::<PyList>()?.iter() {
            let Values { values, given } = self.link.values(py, link.cast::<PyDict>()?)?;
            let [actor, reason] = values.as_slice() else { return Err(Skip) };
            text_at_most(reason, REASON_MAX)?;
            let values = vec![self.actor(py, actor)?, reason.clone()];
            links.push(self.link.instance(py, Values { values, given })?);
        }
        Ok(PyTuple::new(py, links)?.into_any())
    }

    /// A mapping of optional texts, or the field's default (one shared instance, as pydantic's) when omitted.
    fn authority<'py>(&self, py: Python<'py>, value: &Bound<'py, PyAny>) -> Checked<Bound<'py, PyAny>> {
        if self.envelope.is_default(py, AUTHORITY, value) {
            return Ok(value.clone());
        }
        let values = self.authority.values(py, value.cast::<PyDict>()?)?;
        for value in &values.values {
            optional(value, |v| v.cast_exact::<PyString>().map(|_| ()).map_err(|_| Skip))?;
        }
        Ok(self.authority.instance(py, values)?)
    }

    /// A `uuid.UUID` as it is, or a new one of its canonical text (8-4-4-4-12 hex digits, either case).
    fn uuid<'py>(&self, value: &Bound<'py, PyAny>) -> Checked<Bound<'py, PyAny>> {
        let py = value.py();
        let uuid_type = self.uuid_type.bind(py);
        if value.get_type().is(uuid_type) {
            return Ok(value.clone());
        }
        let n = crate::uuid_value(value.cast_exact::<PyString>()?.to_str()?).ok_or(Skip)?;
        Ok(crate::objects::uuid(uuid_type, self.uuid_safe_unknown.bind(py), n)?)
    }

    /// A datetime in UTC itself, as the decoder and the gateway make them: the model's validator would return it unchanged.
    fn utc_timestamp(&self, value: &Bound<'_, PyAny>) -> Checked<()> {
        let tzinfo = value.cast_exact::<PyDateTime>()?.get_tzinfo().ok_or(Skip)?;
        if tzinfo.is(self.utc.bind(value.py())) { Ok(()) } else { Err(Skip) }
    }
}

fn optional(value: &Bound<'_, PyAny>, check: impl FnOnce(&Bound<'_, PyAny>) -> Checked<()>) -> Checked<()> {
    if value.is_none() { Ok(()) } else { check(value) }
}

/// A `str` of `ID_PATTERN`: an ASCII letter or digit, then up to 127 of those or `._:@-`.
fn identifier(value: &Bound<'_, PyAny>) -> Checked<()> {
    let text = value.cast_exact::<PyString>()?.to_str()?.as_bytes();
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || b"._:@-".contains(b);
    match text.split_first() {
        Some((first, rest)) if first.is_ascii_alphanumeric() && rest.len() <= 127 && rest.iter().all(allowed) => Ok(()),
        _ => Err(Skip),
    }
}

/// `None` or a `str` of at most `max` characters (code points, as Python's `len` counts them).
fn text_at_most(value: &Bound<'_, PyAny>, max: isize) -> Checked<()> {
    optional(value, |v| {
        let text = v.cast_exact::<PyString>()?;
        // SAFETY: a live str; the length of a str cannot fail.
        if unsafe { ffi::PyUnicode_GetLength(text.as_ptr()) } <= max { Ok(()) } else { Err(Skip) }
    })
}

/// An `int` (not a bool, no subclass) of at least `min`.
fn integer_at_least(value: &Bound<'_, PyAny>, min: i64) -> Checked<()> {
    let n: i64 = value.cast_exact::<PyInt>()?.extract()?;
    if n >= min { Ok(()) } else { Err(Skip) }
}

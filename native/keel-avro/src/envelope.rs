//! Envelopes built from decoded records without a second validation, when every rule of the
//! envelope model holds.
//!
//! Why: the processor decodes every command, and pydantic spent 5–7 µs building each decoded
//! envelope (four models, three of its validators calling back into Python) where the Avro
//! schema's types already hold most of what it checks. `EnvelopeBuilder.build` checks what they
//! do not (the identifier pattern, the length limits, the version bounds, the exact key sets, a
//! UTC timestamp, the payload's class matching `type`) and returns `None` at the first rule it
//! cannot confirm, so the caller hands the record to pydantic, which accepts it or names the
//! error: what callers see never depends on which path ran. The models' fields and rules are
//! pinned on the Python side (`keel.domain.parsing`), which uses the builder only while they
//! are the ones this file implements.

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

/// A rule the builder cannot confirm: pydantic decides.
struct Skip;

impl<E: Into<PyErr>> From<E> for Skip {
    fn from(_: E) -> Self {
        Skip
    }
}

type Checked<T> = Result<T, Skip>;

/// A model class and its field names, in the model's order.
struct Model {
    class: Py<PyType>,
    fields: Vec<Py<PyString>>,
    fields_set: Py<PySet>,
}

impl Model {
    fn new(py: Python<'_>, class: Bound<'_, PyType>, names: &[&str], given: &Bound<'_, PyList>) -> PyResult<Self> {
        let given: Vec<String> = given.extract()?;
        if given != names {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "{} has the fields {given:?}; the builder knows {names:?}", class.name()?)));
        }
        let fields: Vec<Py<PyString>> = names.iter().map(|n| PyString::intern(py, n).unbind()).collect();
        let fields_set = PySet::new(py, fields.iter().map(|n| n.bind(py)))?.unbind();
        Ok(Model { class: class.unbind(), fields, fields_set })
    }

    fn name<'py>(&self, py: Python<'py>, index: usize) -> &Bound<'py, PyString> {
        self.fields[index].bind(py)
    }

    /// An instance holding `values` (in field order), as pydantic's validation leaves one:
    /// `__dict__`, every field in `__pydantic_fields_set__`, no extra, no private attributes.
    fn instance<'py>(&self, py: Python<'py>, values: &[Bound<'py, PyAny>]) -> PyResult<Bound<'py, PyAny>> {
        let dict = PyDict::new(py);
        for (name, value) in self.fields.iter().zip(values) {
            dict.set_item(name.bind(py), value)?;
        }
        // SAFETY: a live set; `PySet_New` copies it (hashes kept) or returns NULL with an exception set.
        let fields_set = unsafe { Bound::from_owned_ptr_or_err(py, ffi::PySet_New(self.fields_set.as_ptr()))? };
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

/// Builds `keel.domain.envelope.Envelope`s from records `keel_avro.Plan.decode` read.
#[pyclass(frozen, module = "keel_avro")]
pub struct EnvelopeBuilder {
    envelope: Model,
    actor: Model,
    link: Model,
    authority: Model,
    kinds: Py<PyDict>,
    uuid_type: Py<PyType>,
    utc: Py<PyTzInfo>,
}

#[pymethods]
impl EnvelopeBuilder {
    /// The models' classes with their field names (each `list(model.model_fields)`), and the
    /// actor kinds by value; raises `ValueError` when the fields are not the ones built here.
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(py: Python<'_>, envelope: Bound<'_, PyType>, envelope_fields: Bound<'_, PyList>,
           actor: Bound<'_, PyType>, actor_fields: Bound<'_, PyList>,
           link: Bound<'_, PyType>, link_fields: Bound<'_, PyList>,
           authority: Bound<'_, PyType>, authority_fields: Bound<'_, PyList>,
           kinds: Bound<'_, PyDict>) -> PyResult<Self> {
        Ok(EnvelopeBuilder {
            envelope: Model::new(py, envelope, &ENVELOPE_FIELDS, &envelope_fields)?,
            actor: Model::new(py, actor, &ACTOR_FIELDS, &actor_fields)?,
            link: Model::new(py, link, &LINK_FIELDS, &link_fields)?,
            authority: Model::new(py, authority, &AUTHORITY_FIELDS, &authority_fields)?,
            kinds: kinds.unbind(),
            uuid_type: py.import("uuid")?.getattr("UUID")?.cast_into::<PyType>()?.unbind(),
            utc: PyTzInfo::utc(py)?.to_owned().unbind(),
        })
    }

    /// The envelope of `record` (a decoded envelope record) carrying `payload` (its validated
    /// payload model), or `None` when a rule cannot be confirmed here.
    fn build<'py>(&self, py: Python<'py>, record: &Bound<'py, PyAny>, payload: &Bound<'py, PyAny>)
                  -> PyResult<Option<Bound<'py, PyAny>>> {
        let Ok(record) = record.cast::<PyDict>() else { return Ok(None) };
        let values = match self.envelope_values(py, record, payload) {
            Ok(values) => values,
            Err(Skip) => return Ok(None),
        };
        self.envelope.instance(py, &values).map(Some)
    }
}

impl EnvelopeBuilder {
    /// The envelope's field values in order, its nested models built; `Skip` at the first rule not confirmed.
    fn envelope_values<'py>(&self, py: Python<'py>, record: &Bound<'py, PyDict>, payload: &Bound<'py, PyAny>)
                            -> Checked<Vec<Bound<'py, PyAny>>> {
        let values = fields(py, record, &self.envelope)?;
        let [id, tenant_id, actor, delegation, on_behalf_of, authority, message_type, schema_version,
             aggregate_id, expected_version, version, causation_id, correlation_id, occurred_at,
             traceparent, given_payload] = values.as_slice() else { return Err(Skip) };
        self.uuid(id)?;
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
        optional(causation_id, |v| self.uuid(v))?;
        self.uuid(correlation_id)?;
        self.utc_timestamp(occurred_at)?;
        text_at_most(traceparent, TRACEPARENT_MAX)?;
        if !given_payload.is(payload) || payload.get_type().name()?.to_str()? != message_type_text.to_str()? {
            return Err(Skip);
        }
        Ok(vec![id.clone(), tenant_id.clone(), actor, delegation, on_behalf_of.clone(), authority,
                message_type.clone(), schema_version.clone(), aggregate_id.clone(), expected_version.clone(),
                version.clone(), causation_id.clone(), correlation_id.clone(), occurred_at.clone(),
                traceparent.clone(), payload.clone()])
    }

    fn actor<'py>(&self, py: Python<'py>, value: &Bound<'py, PyAny>) -> Checked<Bound<'py, PyAny>> {
        let values = fields(py, value.cast::<PyDict>()?, &self.actor)?;
        let [kind, id] = values.as_slice() else { return Err(Skip) };
        let kind = self.kinds.bind(py).get_item(kind.cast_exact::<PyString>()?)?.ok_or(Skip)?;
        identifier(id)?;
        Ok(self.actor.instance(py, &[kind, id.clone()])?)
    }

    fn delegation<'py>(&self, py: Python<'py>, value: &Bound<'py, PyAny>) -> Checked<Bound<'py, PyAny>> {
        let mut links = Vec::new();
        for link in value.cast_exact::<PyList>()?.iter() {
            let values = fields(py, link.cast::<PyDict>()?, &self.link)?;
            let [actor, reason] = values.as_slice() else { return Err(Skip) };
            text_at_most(reason, REASON_MAX)?;
            links.push(self.link.instance(py, &[self.actor(py, actor)?, reason.clone()])?);
        }
        Ok(PyTuple::new(py, links)?.into_any())
    }

    fn authority<'py>(&self, py: Python<'py>, value: &Bound<'py, PyAny>) -> Checked<Bound<'py, PyAny>> {
        let values = fields(py, value.cast::<PyDict>()?, &self.authority)?;
        for value in &values {
            optional(value, |v| v.cast_exact::<PyString>().map(|_| ()).map_err(|_| Skip))?;
        }
        Ok(self.authority.instance(py, &values)?)
    }

    fn uuid(&self, value: &Bound<'_, PyAny>) -> Checked<()> {
        if value.get_type().is(self.uuid_type.bind(value.py())) { Ok(()) } else { Err(Skip) }
    }

    /// A datetime in UTC itself, as the decoder makes them: the model's validator would return it unchanged.
    fn utc_timestamp(&self, value: &Bound<'_, PyAny>) -> Checked<()> {
        let tzinfo = value.cast_exact::<PyDateTime>()?.get_tzinfo().ok_or(Skip)?;
        if tzinfo.is(self.utc.bind(value.py())) { Ok(()) } else { Err(Skip) }
    }
}

/// The values of `dict` for exactly `model`'s fields, in order: no field missing, none more.
fn fields<'py>(py: Python<'py>, dict: &Bound<'py, PyDict>, model: &Model) -> Checked<Vec<Bound<'py, PyAny>>> {
    if dict.len() != model.fields.len() {
        return Err(Skip);
    }
    (0..model.fields.len()).map(|i| dict.get_item(model.name(py, i))?.ok_or(Skip)).collect()
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

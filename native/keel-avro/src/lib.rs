//! Keel's Avro binary codec: a plan compiled once from a fastavro-parsed schema, then used
//! to write Python records straight into Avro bytes and to read those bytes straight back
//! into the Python values fastavro's `schemaless_reader` returns.
//!
//! Hand-written rather than built on the `apache-avro` crate: that crate encodes through its
//! own `Value` tree (an allocation per field, every string copied twice), and matching
//! fastavro byte for byte and value for value (`uuid.UUID` objects, aware UTC datetimes,
//! fastavro's choice of union branch) would still need a walk of the Python objects on
//! both sides. That walk, and the varint coding under it, is all this crate is.
//!
//! The plan is deliberately strict. `Plan.encode` writes only values of the exact types the
//! schema expects and returns `None` for anything else, so the caller hands that record to
//! fastavro, which writes it with its own coercions or raises its own error: the bytes and
//! the exceptions callers see never depend on which core ran. A schema using an Avro
//! feature the plan does not compile raises `UnsupportedSchema` when the plan is built.

use std::collections::HashMap;

mod audit;
mod envelope;
mod objects;

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyBytes, PyDateAccess, PyDateTime, PyDict, PyFloat, PyInt, PyList, PyString,
    PyTimeAccess, PyTuple, PyType, PyTzInfo, PyTzInfoAccess,
};

create_exception!(
    keel_avro,
    UnsupportedSchema,
    PyValueError,
    "The schema uses an Avro feature the plan does not compile (fastavro handles it)."
);
create_exception!(
    keel_avro,
    CorruptData,
    PyValueError,
    "The bytes are not a record of the plan's schema."
);

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// One compiled schema node. Named records and enums live in the plan's tables, so a
/// recursive or repeated named type is an index, not a copy.
#[derive(Clone)]
enum Node {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    Bytes,
    String,
    /// `{"type": "string", "logicalType": "uuid"}`: `uuid.UUID` (or a str) in, `uuid.UUID` out.
    Uuid,
    /// `{"type": "long", "logicalType": "timestamp-micros"}`: aware UTC datetime (or int) in, aware UTC datetime out.
    TimestampMicros,
    TimestampMillis,
    Fixed(usize),
    Enum(usize),
    Array(Box<Node>),
    Map(Box<Node>),
    Record(usize),
    /// A union of `null` and at most one other branch, the only unions whose branch fastavro
    /// chooses by the value alone (`None` or not); wider unions are unsupported.
    Union {
        null: Option<i64>,
        value: Option<(i64, Box<Node>)>,
    },
}

struct Field {
    name: Py<PyString>,
    node: Node,
}

struct Record {
    fields: Vec<Field>,
}

struct Enum {
    symbols: Vec<Py<PyString>>,
}

/// Builds a plan's tables from a parsed schema (full names, as `fastavro.parse_schema` leaves them).
struct Compiler<'py> {
    py: Python<'py>,
    records: Vec<Option<Record>>,
    enums: Vec<Enum>,
    named: HashMap<String, Node>,
}

type Compiled = Result<Node, String>;

impl<'py> Compiler<'py> {
    fn node(&mut self, schema: &Bound<'py, PyAny>) -> Compiled {
        if let Ok(name) = schema.cast::<PyString>() {
            return self.reference(name.to_str().map_err(|e| e.to_string())?);
        }
        if let Ok(branches) = schema.cast::<PyList>() {
            return self.union(branches);
        }
        let dict = schema.cast::<PyDict>().map_err(|_| format!("not a schema: {schema}"))?;
        let kind = text(dict, "type")?.ok_or("a schema without a type")?;
        let logical = text(dict, "logicalType")?;
        match (kind.as_str(), logical.as_deref()) {
            ("record", None) => self.record(dict),
            ("enum", None) => {
                let symbols = item(dict, "symbols")?.ok_or("an enum without symbols")?;
                let symbols = symbols.cast::<PyList>().map_err(|_| "enum symbols are not a list")?;
                let symbols = symbols.iter().map(|s| {
                    let s = s.cast_into::<PyString>().map_err(|_| "an enum symbol is not a string")?;
                    Ok(PyString::intern(self.py, s.to_str().map_err(|e| e.to_string())?).unbind())
                }).collect::<Result<Vec<_>, String>>()?;
                self.enums.push(Enum { symbols });
                self.define(dict, Node::Enum(self.enums.len() - 1))
            }
            ("fixed", None) => {
                let size = item(dict, "size")?.ok_or("a fixed without a size")?;
                let size = size.extract::<usize>().map_err(|e| e.to_string())?;
                self.define(dict, Node::Fixed(size))
            }
            ("array", None) => {
                let items = self.node(&item(dict, "items")?.ok_or("an array without items")?)?;
                if self.zero_width(&items) {
                    // A corrupt count of zero-width items would allocate without reading a byte.
                    return Err("an array of zero-width items".into());
                }
                Ok(Node::Array(Box::new(items)))
            }
            ("map", None) => Ok(Node::Map(Box::new(self.node(&item(dict, "values")?.ok_or("a map without values")?)?))),
            ("string", Some("uuid")) => Ok(Node::Uuid),
            ("long", Some("timestamp-micros")) => Ok(Node::TimestampMicros),
            ("long", Some("timestamp-millis")) => Ok(Node::TimestampMillis),
            (_, Some(logical)) => Err(format!("logical type {logical:?} on {kind:?}")),
            (name, None) => self.reference(name),
        }
    }

    /// A primitive type or a named type defined earlier. A record that refers to itself is
    /// unsupported: then every plan's depth is bounded by its schema's, and a crafted deep
    /// message cannot exhaust the stack.
    fn reference(&self, name: &str) -> Compiled {
        match primitive(name).or_else(|| self.named.get(name).cloned()) {
            Some(Node::Record(index)) if self.records[index].is_none() => Err(format!("the recursive record {name:?}")),
            Some(node) => Ok(node),
            None => Err(format!("unknown type {name:?}")),
        }
    }

    fn define(&mut self, dict: &Bound<'py, PyDict>, node: Node) -> Compiled {
        let name = text(dict, "name")?.ok_or("a named type without a name")?;
        self.named.insert(name, node.clone());
        Ok(node)
    }

    fn record(&mut self, dict: &Bound<'py, PyDict>) -> Compiled {
        let index = self.records.len();
        self.records.push(None);
        self.define(dict, Node::Record(index))?; // before the fields: they may refer to it
        let fields = item(dict, "fields")?.ok_or("a record without fields")?;
        let fields = fields.cast::<PyList>().map_err(|_| "record fields are not a list")?;
        let mut compiled = Vec::with_capacity(fields.len());
        for field in fields.iter() {
            let field = field.cast_into::<PyDict>().map_err(|_| "a record field is not a mapping")?;
            let name = text(&field, "name")?.ok_or("a field without a name")?;
            let node = self.node(&item(&field, "type")?.ok_or("a field without a type")?)?;
            compiled.push(Field { name: PyString::intern(self.py, &name).unbind(), node });
        }
        self.records[index] = Some(Record { fields: compiled });
        Ok(Node::Record(index))
    }

    fn union(&mut self, branches: &Bound<'py, PyList>) -> Compiled {
        let (mut null, mut value) = (None, None);
        for (index, branch) in branches.iter().enumerate() {
            let index = index as i64;
            match self.node(&branch)? {
                Node::Null if null.is_none() => null = Some(index),
                Node::Null => return Err("a union with two nulls".into()),
                Node::Union { .. } => return Err("a union in a union".into()),
                _ if value.is_some() => return Err("a union of more than one non-null type".into()),
                node => value = Some((index, Box::new(node))),
            }
        }
        Ok(Node::Union { null, value })
    }

    /// Whether `node` can encode to no bytes at all (`null`, or a record of nothing else).
    fn zero_width(&self, node: &Node) -> bool {
        match node {
            Node::Null | Node::Fixed(0) => true,
            Node::Record(i) => self.records[*i].as_ref()
                .is_some_and(|r| r.fields.iter().all(|f| self.zero_width(&f.node))),
            _ => false,
        }
    }
}

/// The node of a primitive type's name.
fn primitive(name: &str) -> Option<Node> {
    Some(match name {
        "null" => Node::Null,
        "boolean" => Node::Boolean,
        "int" => Node::Int,
        "long" => Node::Long,
        "float" => Node::Float,
        "double" => Node::Double,
        "bytes" => Node::Bytes,
        "string" => Node::String,
        _ => return None,
    })
}

fn item<'py>(dict: &Bound<'py, PyDict>, key: &str) -> Result<Option<Bound<'py, PyAny>>, String> {
    dict.get_item(key).map_err(|e| e.to_string())
}

fn text(dict: &Bound<'_, PyDict>, key: &str) -> Result<Option<String>, String> {
    match item(dict, key)? {
        None => Ok(None),
        Some(value) => value.extract::<String>().map(Some).map_err(|_| format!("{key} is not a string")),
    }
}

/// A value the strict plan does not write: the caller gives the record to fastavro instead.
struct Defer;

type Written = Result<(), Defer>;

impl<E> From<E> for Defer
where
    E: Into<PyErr>,
{
    fn from(_: E) -> Self {
        Defer
    }
}

/// A compiled Avro schema: `encode` writes a record (after `prefix`), `decode` reads one.
#[pyclass(frozen, module = "keel_avro")]
struct Plan {
    root: Node,
    records: Vec<Record>,
    enums: Vec<Enum>,
    prefix: Vec<u8>,
    uuid_type: Py<PyType>,
    uuid_safe_unknown: Py<PyAny>,
    utc: Py<PyTzInfo>,
}

#[pymethods]
impl Plan {
    /// Compile `schema` (a `fastavro.parse_schema` result); raises `UnsupportedSchema`.
    #[new]
    #[pyo3(signature = (schema, prefix = b"".to_vec()))]
    fn new(py: Python<'_>, schema: &Bound<'_, PyAny>, prefix: Vec<u8>) -> PyResult<Self> {
        let mut compiler = Compiler { py, records: Vec::new(), enums: Vec::new(), named: HashMap::new() };
        let root = compiler.node(schema).map_err(UnsupportedSchema::new_err)?;
        // `record` fills its slot before it returns, and any error ends the compilation.
        let records = compiler.records.into_iter().map(|r| r.expect("every record compiled")).collect();
        let uuid = py.import("uuid")?;
        Ok(Plan {
            root,
            records,
            enums: compiler.enums,
            prefix,
            uuid_type: uuid.getattr("UUID")?.cast_into::<PyType>()?.unbind(),
            uuid_safe_unknown: uuid.getattr("SafeUUID")?.getattr("unknown")?.unbind(),
            utc: PyTzInfo::utc(py)?.to_owned().unbind(),
        })
    }

    /// `prefix` then the Avro encoding of `record`, exactly as fastavro's `schemaless_writer`
    /// writes it; `None` when a value is not of the exact type the schema expects.
    fn encode<'py>(&self, py: Python<'py>, record: &Bound<'py, PyAny>) -> Option<Bound<'py, PyBytes>> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&self.prefix);
        self.write(py, &self.root, record, &mut out).ok()?;
        Some(PyBytes::new(py, &out))
    }

    /// The record encoded in `data` from byte `offset` on, as fastavro's `schemaless_reader`
    /// returns it (bytes after the record are ignored, as there); raises `CorruptData`.
    #[pyo3(signature = (data, offset = 0))]
    fn decode<'py>(&self, py: Python<'py>, data: &[u8], offset: usize) -> PyResult<Bound<'py, PyAny>> {
        if offset > data.len() {
            return Err(CorruptData::new_err(format!("offset {offset} is past the end ({} bytes)", data.len())));
        }
        let mut reader = Reader { data, pos: offset };
        self.read(py, &self.root, &mut reader)
    }
}

impl Plan {
    fn write(&self, py: Python<'_>, node: &Node, value: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> Written {
        match node {
            Node::Null if value.is_none() => Ok(()),
            Node::Boolean if value.is_exact_instance_of::<PyBool>() => {
                out.push(u8::from(value.is_truthy()?));
                Ok(())
            }
            Node::Int => {
                let n: i32 = integer(value)?.extract()?;
                put_long(out, i64::from(n));
                Ok(())
            }
            Node::Long => {
                put_long(out, integer(value)?.extract()?);
                Ok(())
            }
            Node::Float => {
                let x = value.cast::<PyFloat>()?.value();
                let narrowed = x as f32;
                if x.is_finite() && !narrowed.is_finite() {
                    return Err(Defer); // fastavro decides what a too-large float becomes
                }
                out.extend_from_slice(&narrowed.to_le_bytes());
                Ok(())
            }
            Node::Double => {
                out.extend_from_slice(&value.cast::<PyFloat>()?.value().to_le_bytes());
                Ok(())
            }
            Node::Bytes => {
                put_bytes(out, value.cast::<PyBytes>()?.as_bytes());
                Ok(())
            }
            Node::String => {
                put_bytes(out, value.cast::<PyString>()?.to_str()?.as_bytes());
                Ok(())
            }
            Node::Uuid => {
                if value.get_type().is(self.uuid_type.bind(py)) {
                    let n: u128 = value.getattr(intern!(py, "int"))?.extract()?;
                    put_bytes(out, &uuid_text(n));
                } else {
                    put_bytes(out, value.cast::<PyString>()?.to_str()?.as_bytes());
                }
                Ok(())
            }
            Node::TimestampMicros | Node::TimestampMillis => {
                let n = if value.is_exact_instance_of::<PyDateTime>() {
                    let datetime = value.cast::<PyDateTime>()?;
                    // Only UTC is exact without calling the tzinfo; naive and other zones go to fastavro.
                    if !datetime.get_tzinfo().is_some_and(|tz| tz.is(self.utc.bind(py))) {
                        return Err(Defer);
                    }
                    let (seconds, micros) = epoch_seconds(datetime);
                    if matches!(node, Node::TimestampMicros) {
                        seconds * 1_000_000 + micros
                    } else {
                        seconds * 1_000 + micros / 1_000
                    }
                } else {
                    integer(value)?.extract()?
                };
                put_long(out, n);
                Ok(())
            }
            Node::Fixed(size) => {
                let data = value.cast::<PyBytes>()?.as_bytes();
                if data.len() != *size {
                    return Err(Defer);
                }
                out.extend_from_slice(data);
                Ok(())
            }
            Node::Enum(index) => {
                let symbol = value.cast::<PyString>()?.to_str()?;
                let symbols = &self.enums[*index].symbols;
                let position = symbols.iter().position(|s| s.bind(py).to_str().is_ok_and(|s| s == symbol)).ok_or(Defer)?;
                put_long(out, position as i64);
                Ok(())
            }
            Node::Array(items) => {
                if let Ok(list) = value.cast_exact::<PyList>() {
                    self.write_items(py, items, list.len(), list.iter(), out)
                } else {
                    let tuple = value.cast_exact::<PyTuple>()?;
                    self.write_items(py, items, tuple.len(), tuple.iter(), out)
                }
            }
            Node::Map(values) => {
                let dict = value.cast_exact::<PyDict>()?;
                if !dict.is_empty() {
                    put_long(out, dict.len() as i64);
                    for (key, item) in dict.iter() {
                        put_bytes(out, key.cast::<PyString>()?.to_str()?.as_bytes());
                        self.write(py, values, &item, out)?;
                    }
                }
                out.push(0);
                Ok(())
            }
            Node::Record(index) => {
                let dict = value.cast_exact::<PyDict>()?;
                let fields = &self.records[*index].fields;
                for field in fields {
                    // A missing field may take its default in fastavro: that is its call.
                    let item = dict.get_item(field.name.bind(py))?.ok_or(Defer)?;
                    self.write(py, &field.node, &item, out)?;
                }
                // fastavro's union validation rejects a record whose "-type" names another
                // record; with every field found, extra keys exist only if the dict is longer.
                if dict.len() > fields.len() && dict.contains(intern!(py, "-type"))? {
                    return Err(Defer);
                }
                Ok(())
            }
            Node::Union { null, value: branch } => {
                if value.is_none() {
                    put_long(out, null.ok_or(Defer)?);
                    return Ok(());
                }
                // A tuple in a union is fastavro's (branch name, value) notation.
                if value.is_instance_of::<PyTuple>() {
                    return Err(Defer);
                }
                let (index, node) = branch.as_ref().ok_or(Defer)?;
                put_long(out, *index);
                self.write(py, node, value, out)
            }
            _ => Err(Defer),
        }
    }

    fn write_items<'py>(&self, py: Python<'py>, node: &Node, len: usize,
                        items: impl Iterator<Item = Bound<'py, PyAny>>, out: &mut Vec<u8>) -> Written {
        if len > 0 {
            put_long(out, len as i64);
            for item in items {
                self.write(py, node, &item, out)?;
            }
        }
        out.push(0);
        Ok(())
    }

    fn read<'py>(&self, py: Python<'py>, node: &Node, reader: &mut Reader<'_>) -> PyResult<Bound<'py, PyAny>> {
        Ok(match node {
            Node::Null => py.None().into_bound(py),
            Node::Boolean => PyBool::new(py, reader.byte()? != 0).to_owned().into_any(),
            Node::Int | Node::Long => reader.long()?.into_pyobject(py)?.into_any(),
            Node::Float => {
                let bytes = reader.take(4)?;
                f64::from(f32::from_le_bytes(bytes.try_into().expect("4 bytes"))).into_pyobject(py)?.into_any()
            }
            Node::Double => {
                let bytes = reader.take(8)?;
                f64::from_le_bytes(bytes.try_into().expect("8 bytes")).into_pyobject(py)?.into_any()
            }
            Node::Bytes => {
                let len = reader.len()?;
                PyBytes::new(py, reader.take(len)?).into_any()
            }
            Node::String => PyString::new(py, reader.text()?).into_any(),
            Node::Uuid => {
                let text = reader.text()?;
                match uuid_value(text) {
                    Some(n) => self.new_uuid(py, n)?,
                    // Any other spelling uuid.UUID accepts (braces, "urn:uuid:", no hyphens...).
                    None => self.uuid_type.bind(py).call1((text,))
                        .map_err(|e| CorruptData::new_err(format!("uuid {text:?}: {e}")))?,
                }
            }
            Node::TimestampMicros => self.timestamp(py, reader.long()?)?,
            Node::TimestampMillis => {
                let at = reader.pos;
                let millis = reader.long()?;
                let micros = millis.checked_mul(1_000)
                    .ok_or_else(|| CorruptData::new_err(format!("timestamp-millis {millis} out of range at byte {at}")))?;
                self.timestamp(py, micros)?
            }
            Node::Fixed(size) => PyBytes::new(py, reader.take(*size)?).into_any(),
            Node::Enum(index) => {
                let at = reader.pos;
                let symbols = &self.enums[*index].symbols;
                let position = reader.long()?;
                let symbol = usize::try_from(position).ok().and_then(|p| symbols.get(p)).ok_or_else(|| {
                    CorruptData::new_err(format!("enum index {position} out of range at byte {at}"))
                })?;
                symbol.bind(py).clone().into_any()
            }
            Node::Array(items) => {
                let list = PyList::empty(py);
                while let Some(count) = reader.block()? {
                    for _ in 0..count {
                        list.append(self.read(py, items, reader)?)?;
                    }
                }
                list.into_any()
            }
            Node::Map(values) => {
                let dict = PyDict::new(py);
                while let Some(count) = reader.block()? {
                    for _ in 0..count {
                        let key = PyString::new(py, reader.text()?);
                        dict.set_item(key, self.read(py, values, reader)?)?;
                    }
                }
                dict.into_any()
            }
            Node::Record(index) => {
                let dict = PyDict::new(py);
                for field in &self.records[*index].fields {
                    dict.set_item(field.name.bind(py), self.read(py, &field.node, reader)?)?;
                }
                dict.into_any()
            }
            Node::Union { null, value } => {
                let at = reader.pos;
                let index = reader.long()?;
                if Some(index) == *null {
                    py.None().into_bound(py)
                } else {
                    match value {
                        Some((i, node)) if *i == index => self.read(py, node, reader)?,
                        _ => return Err(CorruptData::new_err(format!("union index {index} out of range at byte {at}"))),
                    }
                }
            }
        })
    }

    /// A `uuid.UUID` with integer `n`, as `uuid.UUID(text)` makes it but without parsing
    /// the text again in Python (the class forbids `__setattr__`; its slots are set as
    /// `object.__setattr__` would).
    fn new_uuid<'py>(&self, py: Python<'py>, n: u128) -> PyResult<Bound<'py, PyAny>> {
        objects::uuid(self.uuid_type.bind(py), self.uuid_safe_unknown.bind(py), n)
    }

    /// `1970-01-01T00:00:00+00:00` plus `micros`, as fastavro adds a timedelta to its epoch.
    fn timestamp<'py>(&self, py: Python<'py>, micros: i64) -> PyResult<Bound<'py, PyAny>> {
        let days = micros.div_euclid(MICROS_PER_DAY);
        let in_day = micros.rem_euclid(MICROS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        if !(1..=9999).contains(&year) {
            return Err(CorruptData::new_err(format!("timestamp {micros} µs is outside years 1-9999")));
        }
        let seconds = in_day / 1_000_000;
        Ok(PyDateTime::new(
            py, year as i32, month, day,
            (seconds / 3600) as u8, (seconds / 60 % 60) as u8, (seconds % 60) as u8,
            (in_day % 1_000_000) as u32, Some(self.utc.bind(py)),
        )?.into_any())
    }
}

/// `value` if it is an int other than a bool (fastavro's own coercions are its business).
fn integer<'a, 'py>(value: &'a Bound<'py, PyAny>) -> Result<&'a Bound<'py, PyInt>, Defer> {
    if value.is_instance_of::<PyBool>() {
        return Err(Defer);
    }
    Ok(value.cast::<PyInt>()?)
}

fn put_long(out: &mut Vec<u8>, n: i64) {
    let mut zigzag = ((n << 1) ^ (n >> 63)) as u64;
    while zigzag >= 0x80 {
        out.push(zigzag as u8 | 0x80);
        zigzag >>= 7;
    }
    out.push(zigzag as u8);
}

fn put_bytes(out: &mut Vec<u8>, data: &[u8]) {
    put_long(out, data.len() as i64);
    out.extend_from_slice(data);
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `str(uuid.UUID(int=n))`: 8-4-4-4-12 lowercase hex digits.
fn uuid_text(n: u128) -> [u8; 36] {
    let mut text = [b'-'; 36];
    let mut digit = 0;
    for (i, slot) in text.iter_mut().enumerate() {
        if !matches!(i, 8 | 13 | 18 | 23) {
            *slot = HEX[(n >> (124 - 4 * digit)) as usize & 0xf];
            digit += 1;
        }
    }
    text
}

/// The integer of a canonical 8-4-4-4-12 UUID (either case); `None` for any other text.
pub(crate) fn uuid_value(text: &str) -> Option<u128> {
    let bytes = text.as_bytes();
    if bytes.len() != 36 {
        return None;
    }
    let mut n: u128 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if b != b'-' {
                return None;
            }
            continue;
        }
        n = n << 4 | u128::from((b as char).to_digit(16)?);
    }
    Some(n)
}

/// Whole seconds and the microseconds of a UTC datetime since the Unix epoch.
fn epoch_seconds(datetime: &Bound<'_, PyDateTime>) -> (i64, i64) {
    let days = days_from_civil(datetime.get_year().into(), datetime.get_month().into(), datetime.get_day().into());
    let seconds = days * 86_400 + i64::from(datetime.get_hour()) * 3_600
        + i64::from(datetime.get_minute()) * 60 + i64::from(datetime.get_second());
    (seconds, i64::from(datetime.get_microsecond()))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A cursor over the encoded bytes; every failure names the byte it happened at.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> PyResult<u8> {
        let byte = *self.data.get(self.pos)
            .ok_or_else(|| CorruptData::new_err(format!("truncated at byte {}", self.pos)))?;
        self.pos += 1;
        Ok(byte)
    }

    /// A zigzag varint of at most 10 bytes (high bits of the 10th wrap, as in fastavro).
    fn long(&mut self) -> PyResult<i64> {
        let start = self.pos;
        let mut n: u64 = 0;
        for shift in (0..70).step_by(7) {
            let byte = self.byte()?;
            n |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok((n >> 1) as i64 ^ -((n & 1) as i64));
            }
        }
        Err(CorruptData::new_err(format!("varint longer than 10 bytes at byte {start}")))
    }

    fn take(&mut self, len: usize) -> PyResult<&'a [u8]> {
        let left = self.data.len() - self.pos;
        if len > left {
            return Err(CorruptData::new_err(format!("{len} bytes needed at byte {}, {left} left", self.pos)));
        }
        let slice = &self.data[self.pos..self.pos + len];
        self.pos += len;
        Ok(slice)
    }

    /// A length prefix, checked against the bytes left so a corrupt one allocates nothing.
    fn len(&mut self) -> PyResult<usize> {
        let at = self.pos;
        let len = self.long()?;
        usize::try_from(len).ok().filter(|&len| len <= self.data.len() - self.pos)
            .ok_or_else(|| CorruptData::new_err(format!("length {len} at byte {at} exceeds the {} bytes left",
                                                        self.data.len() - self.pos)))
    }

    fn text(&mut self) -> PyResult<&'a str> {
        let len = self.len()?;
        let at = self.pos;
        std::str::from_utf8(self.take(len)?)
            .map_err(|e| CorruptData::new_err(format!("invalid UTF-8 in the string at byte {at}: {e}")))
    }

    /// The item count of the next array or map block, `None` at the end marker. A negative
    /// count is followed by the block's byte size, which is skipped. Every item takes at
    /// least one byte (zero-width items are unsupported), so a count above the bytes left is corrupt.
    fn block(&mut self) -> PyResult<Option<u64>> {
        let at = self.pos;
        let count = self.long()?;
        if count == 0 {
            return Ok(None);
        }
        if count < 0 {
            self.long()?;
        }
        let count = count.unsigned_abs();
        if count > (self.data.len() - self.pos) as u64 {
            return Err(CorruptData::new_err(format!("block of {count} items at byte {at} exceeds the {} bytes left",
                                                    self.data.len() - self.pos)));
        }
        Ok(Some(count))
    }
}

/// `str(value)` of a `uuid.UUID`, formatted here: `UUID.__str__` is Python code (about 7 k
/// instructions a call under callgrind, against a few hundred). Anything else, a subclass of
/// `UUID` included, is `str(value)` itself.
#[pyfunction(name = "uuid_text")]
fn text_of_uuid<'py>(value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyString>> {
    let py = value.py();
    static UUID_TYPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    let uuid_type = UUID_TYPE.get_or_try_init(py, || -> PyResult<Py<PyType>> {
        Ok(py.import("uuid")?.getattr("UUID")?.cast_into::<PyType>()?.unbind())
    })?;
    if !value.get_type().is(uuid_type.bind(py)) {
        return value.str();
    }
    let n: u128 = value.getattr(intern!(py, "int"))?.extract()?;
    let text = uuid_text(n);
    Ok(PyString::new(py, std::str::from_utf8(&text).expect("hex digits and hyphens")))
}

#[pymodule]
fn keel_avro(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Plan>()?;
    module.add_function(wrap_pyfunction!(text_of_uuid, module)?)?;
    module.add_function(wrap_pyfunction!(audit::audit_head, module)?)?;
    module.add_class::<envelope::EnvelopeBuilder>()?;
    module.add("ID_PATTERN", envelope::ID_PATTERN)?;
    module.add("UnsupportedSchema", module.py().get_type::<UnsupportedSchema>())?;
    module.add("CorruptData", module.py().get_type::<CorruptData>())?;
    Ok(())
}

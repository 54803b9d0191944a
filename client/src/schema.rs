//! Schemas for LLM function calling, as Python's `schema_function`: a function's `__schema__`
//! (`{name, description, parameters}`) generated from its argument struct with `schemars`,
//! field doc comments included, and sent where Python sends it (`_rschema` in descriptors,
//! `service_schema` at registration).

use schemars::JsonSchema;

use crate::error::{Error, Result};
use crate::values::to_value;
use crate::{Map, Value};

/// The `__schema__` of a function named `name` whose keyword arguments are the fields of `A`:
/// `{name, description, parameters}`. The description is `description`, or else `A`'s doc
/// comment; parameter descriptions come from the fields' doc comments. `title` keys are
/// dropped, as Python does with pydantic schemas.
///
/// ```
/// use hypha_rpc::schema::function_schema;
/// /// Multiply the values by a factor.
/// #[derive(schemars::JsonSchema, serde::Deserialize)]
/// struct Scale {
///     /// The numbers to scale.
///     values: Vec<f64>,
///     /// The factor.
///     factor: f64,
/// }
/// let s = function_schema::<Scale>("scale", None).unwrap();
/// let m = s.as_map().unwrap();
/// assert_eq!(m.get("name").and_then(|v| v.as_str()), Some("scale"));
/// assert_eq!(m.get("description").and_then(|v| v.as_str()), Some("Multiply the values by a factor."));
/// let params = m.get("parameters").unwrap().as_map().unwrap();
/// assert_eq!(params.get("type").and_then(|v| v.as_str()), Some("object"));
/// ```
pub fn function_schema<A: JsonSchema>(name: &str, description: Option<&str>) -> Result<Value> {
    let root = schemars::schema_for!(A);
    let mut params = match to_value(root.as_value())? {
        Value::Map(m) => m,
        other => return Err(Error::Encode(format!("the schema of {name} is a {}, not a map", other.kind()))),
    };
    params.remove("$schema");
    let doc = params.remove("description");
    strip_titles(&mut params);
    let mut schema = Map::with_capacity(3);
    schema.push("name", name);
    let description = match description {
        Some(d) => Value::from(d),
        None => doc.unwrap_or(Value::Nil),
    };
    schema.push("description", description);
    schema.push("parameters", Value::Map(params));
    Ok(Value::Map(schema))
}

/// Removes `title` keys from a JSON schema, except where `title` is a property name.
fn strip_titles(m: &mut Map) {
    m.remove("title");
    for (k, v) in m.iter_mut() {
        let is_properties = k.as_str() == Some("properties");
        match v {
            Value::Map(inner) if is_properties => {
                for (_, p) in inner.iter_mut() {
                    if let Value::Map(p) = p {
                        strip_titles(p);
                    }
                }
            }
            Value::Map(inner) => strip_titles(inner),
            Value::Array(a) => {
                for x in a {
                    if let Value::Map(x) = x {
                        strip_titles(x);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nested types and titles.
    #[derive(JsonSchema, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        /// A title that is a field name must stay.
        title: String,
    }

    /// Does things.
    #[derive(JsonSchema, serde::Deserialize)]
    #[allow(dead_code)]
    struct Args {
        /// How many.
        n: u32,
        /// Optional label.
        label: Option<String>,
        inner: Inner,
    }

    #[test]
    fn schema_has_python_layout_without_titles() {
        let s = function_schema::<Args>("do_it", None).unwrap();
        let m = s.as_map().unwrap();
        let keys: Vec<_> = m.keys().filter_map(|k| k.as_str()).collect();
        assert_eq!(keys, ["name", "description", "parameters"]);
        assert_eq!(m.get("description").unwrap().as_str(), Some("Does things."));
        let p = m.get("parameters").unwrap().as_map().unwrap();
        assert!(p.get("title").is_none() && p.get("$schema").is_none(), "{p:?}");
        let props = p.get("properties").unwrap().as_map().unwrap();
        assert_eq!(
            props.get("n").unwrap().as_map().unwrap().get("description").unwrap().as_str(),
            Some("How many.")
        );
        let required: Vec<_> =
            p.get("required").unwrap().as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
        assert!(required.contains(&"n") && !required.contains(&"label"), "{required:?}");
        let text = format!("{p:?}");
        assert!(text.contains("\"title\""), "the field named title survives: {text}");
        let over = function_schema::<Args>("x", Some("Explicit.")).unwrap();
        assert_eq!(over.as_map().unwrap().get("description").unwrap().as_str(), Some("Explicit."));
    }
}

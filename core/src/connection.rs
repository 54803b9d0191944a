//! The connection handshake and the JSON text control messages (PROTOCOL.md §2).
//!
//! Text frames carry only control messages; everything RPC is binary. We write them exactly as
//! Python's `json.dumps` does (`{"type": "ping"}`), and read them with serde_json.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Write;

use crate::error::ConnectError;
use crate::{Map, Value};

/// What the server says about us in `connection_info`, after a successful handshake.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionInfo {
    /// The server's version (`"0.21.137"`).
    pub hypha_version: Option<String>,
    /// Put in `_rserver` of everything we send; Python compares it before re-sending descriptors.
    pub public_base_url: String,
    /// The server's local URL.
    pub local_base_url: Option<String>,
    /// The workspace manager is `*/<manager_id>`.
    pub manager_id: String,
    /// Our workspace (authoritative).
    pub workspace: String,
    /// Our client id.
    pub client_id: String,
    /// Our user info, as the server sent it.
    pub user: Value,
    /// The token to present when reconnecting.
    pub reconnection_token: Option<String>,
    /// How long `reconnection_token` lives, in seconds.
    pub reconnection_token_life_time: Option<f64>,
}

impl ConnectionInfo {
    /// `*/<manager_id>`.
    pub fn manager_address(&self) -> String {
        alloc::format!("*/{}", self.manager_id)
    }

    pub(crate) fn parse(map: &serde_json::Map<String, serde_json::Value>) -> Result<Self, ConnectError> {
        let s = |k: &str| map.get(k).and_then(|v| v.as_str()).map(String::from);
        let need =
            |k: &'static str| s(k).ok_or_else(|| ConnectError::BadConnectionInfo(alloc::format!("no `{k}`")));
        Ok(ConnectionInfo {
            hypha_version: s("hypha_version"),
            public_base_url: need("public_base_url")?,
            local_base_url: s("local_base_url"),
            manager_id: need("manager_id")?,
            workspace: need("workspace")?,
            client_id: need("client_id")?,
            user: map.get("user").map(json_to_value).unwrap_or_default(),
            reconnection_token: s("reconnection_token"),
            reconnection_token_life_time: map.get("reconnection_token_life_time").and_then(|v| v.as_f64()),
        })
    }
}

/// A JSON control message the server sent, as far as the engine cares.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Control {
    ConnectionInfo(serde_json::Map<String, serde_json::Value>),
    Error(String),
    Pong,
    ReconnectionToken(String),
    Other,
}

pub(crate) fn parse_control(text: &str) -> Result<Control, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let serde_json::Value::Object(map) = v else { return Err("not a JSON object".into()) };
    let kind = map.get("type").and_then(|t| t.as_str()).unwrap_or_default();
    Ok(match kind {
        "connection_info" => Control::ConnectionInfo(map),
        "error" => {
            Control::Error(map.get("message").and_then(|m| m.as_str()).unwrap_or_default().to_string())
        }
        "pong" => Control::Pong,
        "reconnection_token" => match map.get("reconnection_token").and_then(|t| t.as_str()) {
            Some(t) => Control::ReconnectionToken(t.into()),
            None => return Err("reconnection_token without a token".into()),
        },
        _ => Control::Other,
    })
}

/// The first frame: `{"client_id": …, "workspace": …, "token": …, "reconnection_token": …}`,
/// all four keys always present, `null` when absent, in Python's layout.
pub(crate) fn handshake(
    client_id: &str,
    workspace: Option<&str>,
    token: Option<&str>,
    reconnect: Option<&str>,
) -> String {
    let mut out = String::with_capacity(128);
    out.push('{');
    let fields = [
        ("client_id", Some(client_id)),
        ("workspace", workspace),
        ("token", token),
        ("reconnection_token", reconnect),
    ];
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        json_str(&mut out, k);
        out.push_str(": ");
        match v {
            Some(v) => json_str(&mut out, v),
            None => out.push_str("null"),
        }
    }
    out.push('}');
    out
}

/// `{"type": "<kind>"}`, as Python writes it.
pub(crate) fn control(kind: &str) -> String {
    let mut out = String::from("{\"type\": ");
    json_str(&mut out, kind);
    out.push('}');
    out
}

/// Appends `s` as a JSON string literal with the escaping of Python's `json.dumps`
/// (`ensure_ascii`: everything outside printable ASCII as `\uXXXX`).
///
/// ```
/// let mut out = String::new();
/// hypha_rpc_core::connection::json_str(&mut out, "é\n");
/// assert_eq!(out, r#""\u00e9\n""#);
/// ```
pub fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7f => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A JSON value as a msgpack [`Value`] (integers stay integers, objects keep their keys).
pub(crate) fn json_to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => Value::from(u),
            (_, Some(i), _) => Value::from(i),
            (_, _, f) => Value::F64(f.unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(a) => Value::Array(a.iter().map(json_to_value).collect::<Vec<_>>()),
        serde_json::Value::Object(o) => {
            Value::Map(o.iter().map(|(k, v)| (k.as_str(), json_to_value(v))).collect::<Map>())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_layout() {
        assert_eq!(control("ping"), r#"{"type": "ping"}"#);
        assert_eq!(
            handshake("py-peer", None, None, None),
            r#"{"client_id": "py-peer", "workspace": null, "token": null, "reconnection_token": null}"#
        );
        let mut s = String::new();
        json_str(&mut s, "é\"\n😀");
        assert_eq!(s, r#""\u00e9\"\n\ud83d\ude00""#);
    }

    #[test]
    fn control_messages() {
        assert_eq!(parse_control(r#"{"type": "pong"}"#), Ok(Control::Pong));
        assert_eq!(parse_control(r#"{"type":"error","message":"no"}"#), Ok(Control::Error("no".into())));
        assert_eq!(parse_control(r#"{"type":"whatever"}"#), Ok(Control::Other));
        assert!(parse_control("[1]").is_err());
        assert!(parse_control("{").is_err());
    }
}

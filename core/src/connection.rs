//! The connection handshake and the JSON text control messages (PROTOCOL.md §2).
//!
//! Text frames carry only control messages; everything RPC is binary. We write them exactly as
//! Python's `json.dumps` does (`{"type": "ping"}`), and read them with our own small, bounded
//! JSON reader (`json.rs`).

use alloc::string::{String, ToString};
use core::fmt::Write;

use crate::error::ConnectError;
use crate::{Limits, Map, Value};

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

    pub(crate) fn parse(map: &Map) -> Result<Self, ConnectError> {
        let s = |k: &str| map.get(k).and_then(Value::as_str).map(String::from);
        let need =
            |k: &'static str| s(k).ok_or_else(|| ConnectError::BadConnectionInfo(alloc::format!("no `{k}`")));
        Ok(ConnectionInfo {
            hypha_version: s("hypha_version"),
            public_base_url: need("public_base_url")?,
            local_base_url: s("local_base_url"),
            manager_id: need("manager_id")?,
            workspace: need("workspace")?,
            client_id: need("client_id")?,
            user: map.get("user").cloned().unwrap_or_default(),
            reconnection_token: s("reconnection_token"),
            reconnection_token_life_time: map.get("reconnection_token_life_time").and_then(Value::as_f64),
        })
    }
}

/// A JSON control message the server sent, as far as the engine cares.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Control {
    ConnectionInfo(Map),
    Error(String),
    Pong,
    ReconnectionToken(String),
    Other,
}

pub(crate) fn parse_control(text: &str, limits: &Limits) -> Result<Control, String> {
    let Value::Map(map) = crate::json::parse(text, limits)? else { return Err("not a JSON object".into()) };
    let kind = map.get("type").and_then(Value::as_str).unwrap_or_default();
    Ok(match kind {
        "connection_info" => Control::ConnectionInfo(map),
        "error" => Control::Error(map.get("message").and_then(Value::as_str).unwrap_or_default().to_string()),
        "pong" => Control::Pong,
        "reconnection_token" => match map.get("reconnection_token").and_then(Value::as_str) {
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

    fn parse_control_(text: &str) -> Result<Control, String> {
        parse_control(text, &Limits::default())
    }

    #[test]
    fn control_messages() {
        assert_eq!(parse_control_(r#"{"type": "pong"}"#), Ok(Control::Pong));
        assert_eq!(parse_control_(r#"{"type":"error","message":"no"}"#), Ok(Control::Error("no".into())));
        assert_eq!(parse_control_(r#"{"type":"whatever"}"#), Ok(Control::Other));
        assert!(parse_control_("[1]").is_err());
        assert!(parse_control_("{").is_err());
    }
}

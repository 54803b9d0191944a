//! Services we serve: their description, how they are announced to the manager, how they are
//! served to callers, and how a method path finds a function in them.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::codec::rtype::{Method, MethodLayout, PromiseMode, RTypeCodec};
use crate::error::EngineError;
use crate::{Map, Value};

/// Who may call a service's functions and fetch it (`config.visibility`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Visibility {
    /// Anyone who can reach us, and listed.
    Public,
    /// Only clients of our workspace (and `authorized_workspaces`). The default, as in Python.
    #[default]
    Protected,
    /// Anyone who knows the id; not listed.
    Unlisted,
}

impl Visibility {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Protected => "protected",
            Visibility::Unlisted => "unlisted",
        }
    }
}

/// Which functions receive the trusted [`Context`](crate::Context) (`config.require_context`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RequireContext {
    /// None (the default).
    #[default]
    None,
    /// Every function.
    All,
    /// These dotted function paths.
    Functions(Vec<String>),
}

/// One function of a service, as callers see it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FunctionSpec {
    /// Its own name (`_rname`).
    pub name: String,
    /// Its docstring (`_rdoc`).
    pub doc: Option<String>,
    /// Its schema for LLM function calling, as Python's `__schema__`: `{name, description,
    /// parameters: <JSON schema object>}`. Sent as `_rschema` in its descriptor, and in the
    /// registration's `service_schema` as `{type: "function", function: <schema, name = key>}`
    /// (PROTOCOL.md §11).
    pub schema: Option<Value>,
}

impl FunctionSpec {
    /// A function called `name`, without doc or schema.
    pub fn new(name: impl Into<String>) -> Self {
        FunctionSpec { name: name.into(), doc: None, schema: None }
    }
    /// Sets the docstring.
    pub fn doc(mut self, doc: impl Into<String>) -> Self {
        self.doc = Some(doc.into());
        self
    }
    /// Sets the JSON schema.
    pub fn schema(mut self, schema: Value) -> Self {
        self.schema = Some(schema);
        self
    }
}

/// A member of a service: a function, or a named group of members (a nested map).
#[derive(Debug, Clone, PartialEq)]
pub enum Member {
    /// A callable.
    Function(FunctionSpec),
    /// A nested map of members.
    Group(Vec<(String, Member)>),
    /// A plain value served as is.
    Value(Value),
}

/// A service to register: its id, metadata and function tree. The engine keeps it and answers
/// calls to its functions with [`Event::Invoke`](crate::Event::Invoke).
///
/// ```
/// use hypha_rpc_core::service::{FunctionSpec, ServiceSpec, Visibility};
/// let svc = ServiceSpec::new("hello")
///     .name("Hello service")
///     .visibility(Visibility::Public)
///     .function("greet", FunctionSpec::new("greet").doc("Say hello."))
///     .function("admin.reset", FunctionSpec::new("reset"));
/// assert!(svc.function_at("admin.reset").is_some());
/// assert!(svc.function_at("admin").is_none());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    /// Local id (`"hello"`); the full id is `<ws>/<client>:<id>`.
    pub id: String,
    /// Display name (defaults to the id).
    pub name: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// `type` (defaults to `"generic"`).
    pub kind: Option<String>,
    /// Documentation text (`docs`).
    pub docs: Option<String>,
    /// `config.visibility`.
    pub visibility: Visibility,
    /// `config.require_context`.
    pub require_context: RequireContext,
    /// `config.authorized_workspaces`: other workspaces allowed to call a protected service.
    pub authorized_workspaces: Vec<String>,
    /// `config.trusted_keys`: when set, only encrypted calls from these public keys (64 hex
    /// characters) get in. An empty list is refused (Python reads it as "no restriction").
    pub trusted_keys: Option<Vec<String>>,
    /// Other `config` keys, passed through to the manager.
    pub config: Map,
    /// The members, in order.
    pub members: Vec<(String, Member)>,
}

impl ServiceSpec {
    /// An empty protected service.
    pub fn new(id: impl Into<String>) -> Self {
        ServiceSpec {
            id: id.into(),
            name: None,
            description: None,
            kind: None,
            docs: None,
            visibility: Visibility::default(),
            require_context: RequireContext::None,
            authorized_workspaces: Vec::new(),
            trusted_keys: None,
            config: Map::new(),
            members: Vec::new(),
        }
    }
    /// Sets the display name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// Sets the description.
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.description = Some(d.into());
        self
    }
    /// Sets the visibility.
    pub fn visibility(mut self, v: Visibility) -> Self {
        self.visibility = v;
        self
    }
    /// Sets which functions get the context.
    pub fn require_context(mut self, r: RequireContext) -> Self {
        self.require_context = r;
        self
    }
    /// Only encrypted calls from these public keys (64 hex characters each) get in.
    pub fn trusted_keys<S: Into<String>>(mut self, keys: impl IntoIterator<Item = S>) -> Self {
        self.trusted_keys = Some(keys.into_iter().map(Into::into).collect());
        self
    }
    /// Adds a function at a dotted path (`"greet"`, `"admin.reset"`), creating groups.
    pub fn function(mut self, path: &str, f: FunctionSpec) -> Self {
        insert(&mut self.members, path, Member::Function(f));
        self
    }
    /// Adds a plain value at a dotted path.
    pub fn value(mut self, path: &str, v: impl Into<Value>) -> Self {
        insert(&mut self.members, path, Member::Value(v.into()));
        self
    }

    /// The function at a dotted path, if there is one (never a group or a value).
    pub fn function_at(&self, path: &str) -> Option<&FunctionSpec> {
        let mut members = &self.members;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let (_, m) = members.iter().find(|(k, _)| k == part)?;
            match (m, parts.peek()) {
                (Member::Function(f), None) => return Some(f),
                (Member::Group(g), Some(_)) => members = g,
                _ => return None,
            }
        }
        None
    }

    /// Whether the function at `path` receives the context.
    pub fn wants_context(&self, path: &str) -> bool {
        match &self.require_context {
            RequireContext::None => false,
            RequireContext::All => true,
            RequireContext::Functions(list) => list.iter().any(|p| p == path),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), EngineError> {
        check_name("service id", &self.id)?;
        if let Some(keys) = &self.trusted_keys {
            if keys.is_empty() {
                return Err(EngineError::Encryption(
                    "trusted_keys is empty: omit it to let every caller in, or list the allowed keys".into(),
                ));
            }
            if let Some(bad) = keys.iter().find(|k| crate::crypto::key_from_hex(k).is_none()) {
                return Err(EngineError::Encryption(alloc::format!(
                    "trusted key {bad:?} is not 64 hex characters"
                )));
            }
        }
        fn walk(members: &[(String, Member)]) -> Result<(), EngineError> {
            for (k, m) in members {
                check_name("member name", k)?;
                if let Member::Group(g) = m {
                    walk(g)?;
                }
            }
            Ok(())
        }
        walk(&self.members)
    }

    /// `config` as sent: the user's own `config` entries keep their place (so a layout like
    /// Python's built-in `{require_context, visibility, api_version}` is kept), then
    /// `visibility`, `require_context` and `authorized_workspaces` are set, then `workspace`.
    fn config_map(&self, workspace: Option<&str>) -> Map {
        let mut c = self.config.clone();
        c.insert("visibility", self.visibility.as_str());
        match &self.require_context {
            RequireContext::None => {}
            RequireContext::All => {
                c.insert("require_context", true);
            }
            RequireContext::Functions(list) => {
                c.insert(
                    "require_context",
                    Value::Array(list.iter().map(|s| Value::from(s.as_str())).collect()),
                );
            }
        }
        if !self.authorized_workspaces.is_empty() {
            let ws = self.authorized_workspaces.iter().map(|s| Value::from(s.as_str())).collect();
            c.insert("authorized_workspaces", Value::Array(ws));
        }
        if let Some(keys) = &self.trusted_keys {
            let keys = keys.iter().map(|k| Value::from(k.to_ascii_lowercase())).collect();
            c.insert("trusted_keys", Value::Array(keys));
        }
        if let Some(ws) = workspace {
            c.insert("workspace", ws);
        }
        c
    }

    /// The service info sent to the manager's `register_service` (PROTOCOL.md §10.2): metadata
    /// only, no method descriptors.
    pub(crate) fn registration(&self, workspace: &str, client_id: &str) -> Value {
        let mut m = Map::with_capacity(8);
        m.push("config", self.config_map(Some(workspace)));
        m.push("id", format!("{workspace}/{client_id}:{}", self.id));
        m.push("name", self.name.clone().unwrap_or_else(|| self.id.clone()));
        m.push("description", self.description.clone());
        m.push("type", self.kind.clone().unwrap_or_else(|| "generic".into()));
        m.push("docs", self.docs.clone());
        m.push("app_id", "*");
        m.push("service_schema", schema_tree(&self.members));
        Value::Map(m)
    }

    /// The service as `built-in.get_service` returns it: functions as method descriptors
    /// pointing at us (PROTOCOL.md §6.3).
    pub(crate) fn served(&self, server: &str, me: &str) -> Value {
        let mut m = Map::new();
        m.push("id", self.id.as_str());
        m.push("name", self.name.clone().unwrap_or_else(|| self.id.clone()));
        if let Some(d) = &self.description {
            m.push("description", d.as_str());
        }
        m.push("config", self.config_map(None));
        let prefix = format!("services.{}", self.id);
        for (k, member) in &self.members {
            m.push(k.as_str(), served_member(member, &format!("{prefix}.{k}"), server, me));
        }
        m.push("type", self.kind.clone().unwrap_or_else(|| "generic".into()));
        Value::Map(m)
    }
}

fn served_member(member: &Member, path: &str, server: &str, me: &str) -> Value {
    match member {
        Member::Function(f) => Method {
            target: me.into(),
            method: path.into(),
            promise: Some(PromiseMode::Compact),
            server: Some(server.into()),
            name: Some(f.name.clone()),
            is_async: None,
            doc: Some(f.doc.clone().into()),
            schema: f.schema.clone(),
            enc_pub: None,
            layout: MethodLayout::Service,
            other: Map::new(),
        }
        .to_value(),
        Member::Group(g) => Value::Map(
            g.iter()
                .map(|(k, m)| (k.as_str(), served_member(m, &format!("{path}.{k}"), server, me)))
                .collect(),
        ),
        Member::Value(v) => v.clone(),
    }
}

fn schema_tree(members: &[(String, Member)]) -> Value {
    let mut m = Map::new();
    for (k, member) in members {
        match member {
            Member::Function(FunctionSpec { schema: Some(s), .. }) => {
                let mut function = s.clone();
                if let Value::Map(f) = &mut function {
                    f.insert("name", k.as_str());
                }
                let mut entry = Map::with_capacity(2);
                entry.push("type", "function");
                entry.push("function", function);
                m.push(k.as_str(), entry);
            }
            Member::Group(g) => {
                let sub = schema_tree(g);
                if sub.as_map().is_some_and(|s| !s.is_empty()) {
                    m.push(k.as_str(), sub);
                }
            }
            _ => {}
        }
    }
    Value::Map(m)
}

fn insert(members: &mut Vec<(String, Member)>, path: &str, leaf: Member) {
    match path.split_once('.') {
        None => match members.iter_mut().find(|(k, _)| k == path) {
            Some((_, m)) => *m = leaf,
            None => members.push((path.to_string(), leaf)),
        },
        Some((head, rest)) => {
            let idx = match members.iter().position(|(k, _)| k == head) {
                Some(i) => i,
                None => {
                    members.push((head.to_string(), Member::Group(Vec::new())));
                    members.len() - 1
                }
            };
            if !matches!(members[idx].1, Member::Group(_)) {
                members[idx].1 = Member::Group(Vec::new());
            }
            if let Member::Group(g) = &mut members[idx].1 {
                insert(g, rest, leaf);
            }
        }
    }
}

/// Ids and member names travel inside dotted method paths and `ws/client:svc` ids.
pub(crate) fn check_name(what: &'static str, name: &str) -> Result<(), EngineError> {
    if name.is_empty() || name.contains(['.', '/', ':', '#', '@', '*']) {
        return Err(EngineError::InvalidName { what, value: name.into() });
    }
    Ok(())
}

/// Our own `built-in` service (PROTOCOL.md §6): the engine answers its calls itself.
pub(crate) fn builtin(workspace: &str, client_id: &str) -> ServiceSpec {
    let p = |props: &[(&str, &str)], required: &[&str]| {
        let mut properties = Map::new();
        for (name, ty) in props {
            let mut t = Map::new();
            t.push("type", *ty);
            properties.push(*name, t);
        }
        let mut params = Map::new();
        params.push("type", "object");
        params.push("properties", properties);
        params.push("required", Value::Array(required.iter().map(|r| Value::from(*r)).collect()));
        params
    };
    let f = |name: &str, doc: &str, params: Map| {
        let mut function = Map::new();
        function.push("name", name);
        function.push("description", doc);
        function.push("parameters", params);
        FunctionSpec::new(name).doc(doc).schema(Value::Map(function))
    };
    let key_hb = p(&[("key", "string"), ("heartbeat", "boolean")], &["key"]);
    let mut config = Map::new();
    config.push("require_context", true);
    config.push("visibility", "public");
    config.push("api_version", 3);
    ServiceSpec {
        id: "built-in".into(),
        name: Some(format!("Builtin services for {workspace}/{client_id}")),
        description: None,
        kind: Some("built-in".into()),
        docs: None,
        visibility: Visibility::Public,
        require_context: RequireContext::All,
        authorized_workspaces: Vec::new(),
        trusted_keys: None,
        config,
        members: Vec::new(),
    }
    .function("ping", f("ping", "Handle ping.", p(&[("msg", "string")], &["msg"])))
    .function(
        "get_service",
        f("get_service", "Get a local service.", p(&[("service_id", "string")], &["service_id"])),
    )
    .function(
        "message_cache.create",
        f(
            "create",
            "Create a message.",
            p(&[("key", "string"), ("heartbeat", "boolean"), ("overwrite", "boolean")], &["key"]),
        ),
    )
    .function(
        "message_cache.append",
        f(
            "append",
            "Append a message.",
            p(&[("key", "string"), ("data", "string"), ("heartbeat", "boolean")], &["key", "data"]),
        ),
    )
    .function(
        "message_cache.set",
        f(
            "set",
            "Set a message chunk.",
            p(
                &[("key", "string"), ("index", "integer"), ("data", "string"), ("heartbeat", "boolean")],
                &["key", "index", "data"],
            ),
        ),
    )
    .function("message_cache.process", f("process", "Process a message.", key_hb))
    .function("message_cache.remove", f("remove", "Remove a message.", p(&[("key", "string")], &["key"])))
}

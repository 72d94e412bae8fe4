//! The registry of function types a node runs: embedded functions registered by code, and
//! remote functions matched by the module's endpoints (`namespace/*` patterns match types
//! the node first meets at run time).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use statemesh_sdk::{StatefulFunction, TypeName, ValueSpecDescriptor};

use crate::module::Module;
use crate::remote::RemoteFunction;

/// How a function type runs.
pub enum FunctionKind {
    /// Rust code in-process.
    Embedded(Arc<dyn StatefulFunction>),
    /// A StateFun request-reply endpoint.
    Remote(Arc<RemoteFunction>),
}

/// A registered function type.
pub struct FunctionEntry {
    /// The implementation.
    pub kind: FunctionKind,
    /// Declared states, in slot order. Remote v3 functions add to them as they negotiate.
    specs: RwLock<Arc<[ValueSpecDescriptor]>>,
    /// Invocation times of this type (embedded: one per message; remote: one per batch
    /// call), recorded through each shard thread's local copy (`instance::record`).
    pub latency: prometheus::Histogram,
    /// Messages of this type dead-lettered.
    pub dead_letters: std::sync::atomic::AtomicU64,
}

/// Buckets of the per-type invocation times, seconds.
pub const LATENCY_BUCKETS: [f64; 18] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
    5e-2, 0.1, 1.0, 10.0,
];

impl FunctionEntry {
    fn new(kind: FunctionKind, specs: Vec<ValueSpecDescriptor>) -> Self {
        FunctionEntry {
            kind,
            specs: RwLock::new(specs.into()),
            latency: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new("invocation_seconds", "per type")
                    .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid histogram"),
            dead_letters: Default::default(),
        }
    }

    /// The declared states.
    pub fn specs(&self) -> Arc<[ValueSpecDescriptor]> {
        self.specs.read().clone()
    }

    /// Registers states a remote function asked for; returns whether any was new or changed.
    pub fn add_specs(&self, wanted: Vec<ValueSpecDescriptor>) -> bool {
        let mut specs = self.specs.write();
        let mut v: Vec<ValueSpecDescriptor> = specs.to_vec();
        let mut changed = false;
        for w in wanted {
            match v.iter_mut().find(|s| s.name == w.name) {
                Some(s) if *s == w => {}
                Some(s) => {
                    *s = w;
                    changed = true;
                }
                None => {
                    v.push(w);
                    changed = true;
                }
            }
        }
        if changed {
            *specs = v.into();
        }
        changed
    }
}

/// Function types by name. Embedded types are fixed once the node runs; remote types are
/// added on first use from the module's endpoints.
#[derive(Default)]
pub struct Registry {
    embedded: HashMap<TypeName, Arc<FunctionEntry>>,
    /// The bundled examples: they yield to the module's endpoints.
    bundled: HashMap<TypeName, Arc<FunctionEntry>>,
    module: Module,
    pools: Vec<u64>,
    remote: RwLock<HashMap<TypeName, Arc<FunctionEntry>>>,
    /// Remote function requests are signed with this key.
    signing_key: Option<Arc<[u8]>>,
}

impl Registry {
    /// Registers (or replaces) an embedded function type.
    pub fn register(&mut self, typ: TypeName, function: Arc<dyn StatefulFunction>) {
        let specs = function.value_specs();
        self.embedded.insert(
            typ,
            Arc::new(FunctionEntry::new(FunctionKind::Embedded(function), specs)),
        );
    }

    /// Registers a bundled example function type; a module endpoint serving the same type
    /// takes precedence over it.
    pub fn register_bundled(&mut self, typ: TypeName, function: Arc<dyn StatefulFunction>) {
        let specs = function.value_specs();
        self.bundled.insert(
            typ,
            Arc::new(FunctionEntry::new(FunctionKind::Embedded(function), specs)),
        );
    }

    /// Uses a module's remote endpoints (keep-alive pools per endpoint and shard thread).
    pub fn set_module(&mut self, module: Module) {
        self.pools = module
            .endpoints
            .iter()
            .map(|_| crate::remote::new_pool_id())
            .collect();
        self.module = module;
    }

    /// Signs remote function requests with `key` (`[auth] function_signing_key`).
    pub fn set_signing_key(&mut self, key: Option<&str>) {
        self.signing_key = key.map(|k| Arc::from(k.as_bytes()));
    }

    /// The module in use.
    pub fn module(&self) -> &Module {
        &self.module
    }

    /// The entry of a type: functions registered in code first, then a module endpoint that
    /// serves it, then the bundled examples.
    pub fn get(&self, typ: &TypeName) -> Option<Arc<FunctionEntry>> {
        if let Some(e) = self.embedded.get(typ) {
            return Some(e.clone());
        }
        if let Some(e) = self.remote.read().get(typ) {
            return Some(e.clone());
        }
        let Some(i) = self
            .module
            .endpoints
            .iter()
            .position(|e| e.functions.matches(typ.as_str()))
        else {
            return self.bundled.get(typ).cloned();
        };
        let endpoint = &self.module.endpoints[i];
        let f = RemoteFunction::new(
            typ.clone(),
            endpoint.clone(),
            self.pools[i],
            self.signing_key.clone(),
        );
        let entry = Arc::new(FunctionEntry::new(
            FunctionKind::Remote(Arc::new(f)),
            endpoint.states.clone(),
        ));
        Some(
            self.remote
                .write()
                .entry(typ.clone())
                .or_insert(entry)
                .clone(),
        )
    }

    /// Every function type met so far (embedded, bundled, and remote types invoked at least
    /// once), with its entry, sorted by name; bundled types a module endpoint serves are left
    /// out.
    pub fn entries(&self) -> Vec<(String, Arc<FunctionEntry>)> {
        let mut v: Vec<(String, Arc<FunctionEntry>)> = self
            .embedded
            .iter()
            .map(|(t, e)| (t.to_string(), e.clone()))
            .collect();
        for (t, e) in &self.bundled {
            if !self.embedded.contains_key(t)
                && !self
                    .module
                    .endpoints
                    .iter()
                    .any(|p| p.functions.matches(t.as_str()))
            {
                v.push((t.to_string(), e.clone()));
            }
        }
        for (t, e) in self.remote.read().iter() {
            v.push((t.to_string(), e.clone()));
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Registered type names and endpoint patterns, sorted.
    pub fn types(&self) -> Vec<String> {
        let mut v: Vec<String> = self.embedded.keys().map(|t| t.to_string()).collect();
        for t in self.bundled.keys() {
            if !self
                .module
                .endpoints
                .iter()
                .any(|e| e.functions.matches(t.as_str()))
            {
                v.push(t.to_string());
            }
        }
        for e in &self.module.endpoints {
            v.push(match &e.functions {
                crate::module::FunctionPattern::Exact(t) => t.clone(),
                crate::module::FunctionPattern::Namespace(ns) => format!("{ns}/*"),
            });
        }
        v.sort();
        v
    }
}

//! The registry of function types a node runs.

use std::collections::HashMap;
use std::sync::Arc;

use statemesh_sdk::{StatefulFunction, TypeName, ValueSpecDescriptor};

/// A registered function type.
pub struct FunctionEntry {
    /// The implementation.
    pub function: Arc<dyn StatefulFunction>,
    /// Its declared states (in slot order).
    pub specs: Arc<[ValueSpecDescriptor]>,
}

/// Function types by name. Immutable once the node runs.
#[derive(Default, Clone)]
pub struct Registry {
    functions: HashMap<TypeName, Arc<FunctionEntry>>,
}

impl Registry {
    /// Registers (or replaces) a function type.
    pub fn register(&mut self, typ: TypeName, function: Arc<dyn StatefulFunction>) {
        let specs: Arc<[ValueSpecDescriptor]> = function.value_specs().into();
        self.functions
            .insert(typ, Arc::new(FunctionEntry { function, specs }));
    }

    /// The entry of a type.
    pub fn get(&self, typ: &TypeName) -> Option<&Arc<FunctionEntry>> {
        self.functions.get(typ)
    }

    /// All registered type names, sorted.
    pub fn types(&self) -> Vec<String> {
        let mut v: Vec<String> = self.functions.keys().map(|t| t.to_string()).collect();
        v.sort();
        v
    }
}

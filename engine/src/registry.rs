//! The registry: algorithms chosen by name at run time.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::{Algorithm, Error};

type Factory = Arc<dyn Fn() -> Box<dyn Algorithm> + Send + Sync>;

/// What the registry knows about one algorithm.
#[derive(Clone)]
pub struct AlgorithmInfo {
    /// Registry name.
    pub name: String,
    /// One line for `--list`.
    pub description: String,
    /// Whether chunk states combine, so one file can be hashed by several threads.
    pub combinable: bool,
    factory: Factory,
}

impl AlgorithmInfo {
    /// Describes an algorithm made by `factory`.
    pub fn new<F>(name: &str, description: &str, factory: F) -> Self
    where
        F: Fn() -> Box<dyn Algorithm> + Send + Sync + 'static,
    {
        let factory: Factory = Arc::new(factory);
        let combinable = factory().can_combine();
        AlgorithmInfo {
            name: name.to_owned(),
            description: description.to_owned(),
            combinable,
            factory,
        }
    }

    /// A fresh state of this algorithm.
    pub fn instantiate(&self) -> Box<dyn Algorithm> {
        (self.factory)()
    }
}

impl std::fmt::Debug for AlgorithmInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlgorithmInfo")
            .field("name", &self.name)
            .field("combinable", &self.combinable)
            .finish()
    }
}

/// Algorithms by name. [`Registry::with_builtins`] holds every built-in one;
/// other crates add their own with [`Registry::register`].
#[derive(Clone, Default, Debug)]
pub struct Registry {
    entries: BTreeMap<String, AlgorithmInfo>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry holding every built-in algorithm.
    pub fn with_builtins() -> Self {
        let mut r = Registry::new();
        crate::builtin::register_all(&mut r);
        r
    }

    /// Adds (or replaces) an algorithm under `name`.
    pub fn register<F>(&mut self, name: &str, description: &str, factory: F)
    where
        F: Fn() -> Box<dyn Algorithm> + Send + Sync + 'static,
    {
        self.entries.insert(
            name.to_owned(),
            AlgorithmInfo::new(name, description, factory),
        );
    }

    /// Looks up an algorithm's description by name.
    pub fn info(&self, name: &str) -> Result<AlgorithmInfo, Error> {
        if let Some(info) = self.entries.get(name) {
            return Ok(info.clone());
        }
        crate::builtin::lookup_dynamic(name).ok_or_else(|| Error::UnknownAlgorithm {
            name: name.to_owned(),
        })
    }

    /// A fresh state of the algorithm called `name`.
    pub fn get(&self, name: &str) -> Result<Box<dyn Algorithm>, Error> {
        Ok(self.info(name)?.instantiate())
    }

    /// Every registered algorithm, sorted by name. With the built-ins this
    /// includes every `crc16/<name>` of [`Registry::catalog_names`].
    pub fn iter(&self) -> impl Iterator<Item = &AlgorithmInfo> {
        self.entries.values()
    }

    /// The registry names of every CRC-16 of the reveng catalogue
    /// (`crc16/arc`, `crc16/xmodem`, ...), in catalogue order. They resolve
    /// through [`Registry::info`] even in a registry that did not register
    /// them, in any case and with `_` for `-`.
    pub fn catalog_names() -> impl Iterator<Item = &'static str> {
        crate::builtin::CRC16_CATALOG.iter().map(|e| e.name)
    }
}

//! The functions and entities a worker hosts, by name. Names are matched case-insensitively, as
//! Durable Functions does.

use std::collections::{BTreeMap, HashMap};

use keel_core::Orchestrator;

use crate::activity::ErasedActivity;
use crate::entity::Entity;

/// Orchestrators, activities and entities by name.
#[derive(Clone, Default)]
pub struct Registry {
    orchestrators: HashMap<String, Versions>,
    activities: HashMap<String, (String, ErasedActivity)>,
    entities: HashMap<String, (String, Entity)>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("orchestrators", &self.orchestrator_names())
            .field("activities", &self.activity_names())
            .field("entities", &self.entity_names())
            .finish()
    }
}

/// The code of one orchestrator name: for instances of any version, and for
/// instances of a version registered on its own.
#[derive(Clone)]
struct Versions {
    name: String,
    any: Option<Orchestrator>,
    by_version: BTreeMap<String, Orchestrator>,
}

impl Registry {
    /// Registers an orchestrator, for instances of `version` or, with `None`, of any
    /// version that has no code of its own. Panics if that slot is taken: two functions
    /// for one name and version is a programming error.
    pub fn add_orchestrator(&mut self, name: &str, version: Option<&str>, orchestrator: Orchestrator) {
        let versions = self.orchestrators.entry(name.to_lowercase()).or_insert_with(|| Versions {
            name: name.to_string(),
            any: None,
            by_version: BTreeMap::new(),
        });
        let taken = match version {
            None => versions.any.replace(orchestrator).is_some(),
            Some(version) => versions.by_version.insert(version.to_string(), orchestrator).is_some(),
        };
        assert!(!taken, "orchestrator '{name}' (version {version:?}) is registered twice");
    }

    /// Registers an activity. Panics if the name is taken.
    pub fn add_activity(&mut self, name: &str, activity: ErasedActivity) {
        let previous = self.activities.insert(name.to_lowercase(), (name.to_string(), activity));
        assert!(previous.is_none(), "activity '{name}' is registered twice");
    }

    /// Registers an entity. Panics if the name is taken.
    pub fn add_entity(&mut self, name: &str, entity: Entity) {
        let previous = self.entities.insert(name.to_lowercase(), (name.to_string(), entity));
        assert!(previous.is_none(), "entity '{name}' is registered twice");
    }

    /// The entity registered under `name`, matched without regard to case.
    pub fn entity(&self, name: &str) -> Option<&Entity> {
        self.entities.get(&name.to_lowercase()).map(|(_, entity)| entity)
    }

    /// The entities' names as registered, sorted.
    pub fn entity_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.entities.values().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        names
    }

    /// The code for an instance of `name` started with `version`: that version's own,
    /// else the code for any version.
    pub fn orchestrator(&self, name: &str, version: Option<&str>) -> Option<&Orchestrator> {
        let versions = self.orchestrators.get(&name.to_lowercase())?;
        version.and_then(|version| versions.by_version.get(version)).or(versions.any.as_ref())
    }

    /// Whether any code is registered for `name`.
    pub fn hosts_orchestrator(&self, name: &str) -> bool {
        self.orchestrators.contains_key(&name.to_lowercase())
    }

    /// The activity registered under `name`, matched without regard to case.
    pub fn activity(&self, name: &str) -> Option<&ErasedActivity> {
        self.activities.get(&name.to_lowercase()).map(|(_, activity)| activity)
    }

    /// The orchestrators' names as registered, sorted.
    pub fn orchestrator_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.orchestrators.values().map(|versions| versions.name.as_str()).collect();
        names.sort_unstable();
        names
    }

    /// The activities' names as registered, sorted.
    pub fn activity_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.activities.values().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        names
    }
}

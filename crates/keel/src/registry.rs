//! The functions and entities a worker hosts, by name. Names are matched case-insensitively, as
//! Durable Functions does.

use std::collections::HashMap;

use keel_core::Orchestrator;

use crate::activity::ErasedActivity;
use crate::entity::Entity;

/// Orchestrators, activities and entities by name.
#[derive(Clone, Default)]
pub struct Registry {
    orchestrators: HashMap<String, (String, Orchestrator)>,
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

impl Registry {
    /// Registers an orchestrator. Panics if the name is taken: two functions with one
    /// name is a programming error.
    pub fn add_orchestrator(&mut self, name: &str, orchestrator: Orchestrator) {
        let previous = self.orchestrators.insert(name.to_lowercase(), (name.to_string(), orchestrator));
        assert!(previous.is_none(), "orchestrator '{name}' is registered twice");
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

    pub fn entity(&self, name: &str) -> Option<&Entity> {
        self.entities.get(&name.to_lowercase()).map(|(_, entity)| entity)
    }

    pub fn entity_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.entities.values().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        names
    }

    pub fn orchestrator(&self, name: &str) -> Option<&Orchestrator> {
        self.orchestrators.get(&name.to_lowercase()).map(|(_, orchestrator)| orchestrator)
    }

    pub fn activity(&self, name: &str) -> Option<&ErasedActivity> {
        self.activities.get(&name.to_lowercase()).map(|(_, activity)| activity)
    }

    pub fn orchestrator_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.orchestrators.values().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        names
    }

    pub fn activity_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.activities.values().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        names
    }
}

//! The service dependency graph root-cause analysis walks.
//!
//! A topology file lists resources and directed edges along which faults propagate:
//! `from → to` means a fault of `from` can show up on `to` (a VM under its disk, a disk
//! under its database, a database under the applications that query it). `to = "*"` makes
//! `from` upstream of every other resource (a shared network).
//!
//! ```toml
//! [[resource]]
//! id = "db-1"
//! type = "database"
//! service = "orders"
//!
//! [[resource]]
//! id = "app-1"
//! type = "application"
//!
//! [[edge]]
//! from = "db-1"
//! to = "app-1"
//! ```
//!
//! The same structure is accepted as JSON. Loading checks every resource and edge and
//! reports all problems at once: duplicate ids, edges naming unknown resources, self-loops,
//! unknown keys.

use std::collections::{HashMap, VecDeque};

use petgraph::graph::{DiGraph, NodeIndex};
use serde::Deserialize;

/// One resource of the topology.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resource {
    /// Unique id, as it appears in the metrics' `resource` column.
    pub id: String,
    /// Kind (`vm`, `disk`, `database`, `application`, `network`, `cache`, …); picks the
    /// remediations that apply.
    #[serde(rename = "type")]
    pub kind: String,
    /// Owning service, if any.
    #[serde(default)]
    pub service: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EdgeFile {
    from: String,
    to: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopologyFile {
    #[serde(default)]
    resource: Vec<Resource>,
    #[serde(default)]
    edge: Vec<EdgeFile>,
}

/// A validated dependency graph.
#[derive(Debug, Clone)]
pub struct Topology {
    graph: DiGraph<Resource, ()>,
    index: HashMap<String, NodeIndex>,
}

impl Topology {
    /// Parses a topology from TOML (or JSON when `text` starts with `{`); `file` names it in
    /// errors. Every problem is reported, one per line.
    pub fn parse(file: &str, text: &str) -> Result<Self, String> {
        let parsed: TopologyFile = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| format!("{file}: {e}"))?
        } else {
            toml::from_str(text).map_err(|e| format!("{file}: {e}"))?
        };
        Self::build(
            file,
            parsed.resource,
            parsed.edge.into_iter().map(|e| (e.from, e.to)),
        )
    }

    /// A topology from resources and `(from, to)` edges, validated like a file.
    pub fn from_parts(
        resources: Vec<Resource>,
        edges: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, String> {
        Self::build("topology", resources, edges)
    }

    fn build(
        file: &str,
        resources: Vec<Resource>,
        edges: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, String> {
        let mut problems = Vec::new();
        let mut graph = DiGraph::new();
        let mut index = HashMap::new();
        for (i, r) in resources.into_iter().enumerate() {
            if r.id.is_empty() || r.id == "*" {
                problems.push(format!(
                    "{file}: resource {}: `{}` is not a usable id",
                    i + 1,
                    r.id
                ));
                continue;
            }
            if index.contains_key(&r.id) {
                problems.push(format!(
                    "{file}: resource {}: duplicate id `{}`",
                    i + 1,
                    r.id
                ));
                continue;
            }
            let id = r.id.clone();
            index.insert(id, graph.add_node(r));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, (from, to)) in edges.into_iter().enumerate() {
            let where_ = format!("{file}: edge {} ({from} → {to})", i + 1);
            let Some(&a) = index.get(&from) else {
                problems.push(format!("{where_}: unknown resource `{from}`"));
                continue;
            };
            let targets: Vec<NodeIndex> = if to == "*" {
                graph.node_indices().filter(|&n| n != a).collect()
            } else if let Some(&b) = index.get(&to) {
                if a == b {
                    problems.push(format!("{where_}: a resource cannot depend on itself"));
                    continue;
                }
                vec![b]
            } else {
                problems.push(format!("{where_}: unknown resource `{to}`"));
                continue;
            };
            for b in targets {
                if seen.insert((a, b)) {
                    graph.add_edge(a, b, ());
                }
            }
        }
        if problems.is_empty() {
            Ok(Self { graph, index })
        } else {
            Err(problems.join("\n"))
        }
    }

    /// The resource called `id`.
    pub fn resource(&self, id: &str) -> Option<&Resource> {
        self.index.get(id).map(|&n| &self.graph[n])
    }

    /// Number of resources.
    pub fn len(&self) -> usize {
        self.graph.node_count()
    }

    /// Whether the topology has no resources.
    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }

    /// Breadth-first search from `id` along (`Outgoing`) or against (`Incoming`) the edges,
    /// at most `max_hops` deep: every node reached (not `id`) in visiting order, and each
    /// node's predecessor on its shortest path. Neighbours are visited in id order, so ties
    /// resolve the same way on every run.
    fn bfs(
        &self,
        id: &str,
        max_hops: usize,
        direction: petgraph::Direction,
    ) -> (Vec<(NodeIndex, usize)>, HashMap<NodeIndex, NodeIndex>) {
        let mut parent = HashMap::new();
        let mut reached = Vec::new();
        let Some(&start) = self.index.get(id) else {
            return (reached, parent);
        };
        let mut dist: HashMap<NodeIndex, usize> = HashMap::from([(start, 0)]);
        let mut queue = VecDeque::from([start]);
        while let Some(n) = queue.pop_front() {
            let d = dist[&n];
            if d == max_hops {
                continue;
            }
            let mut next: Vec<NodeIndex> = self.graph.neighbors_directed(n, direction).collect();
            next.sort_by(|a, b| self.graph[*a].id.cmp(&self.graph[*b].id));
            for m in next {
                if let std::collections::hash_map::Entry::Vacant(e) = dist.entry(m) {
                    e.insert(d + 1);
                    parent.insert(m, n);
                    queue.push_back(m);
                    reached.push((m, d + 1));
                }
            }
        }
        (reached, parent)
    }

    /// Resources reachable from `id` along edges in at most `max_hops` hops (not `id`
    /// itself), with their distance and the path from `id` (inclusive at both ends).
    /// Intermediate resources need not be anomalous.
    pub fn downstream(&self, id: &str, max_hops: usize) -> Vec<(String, usize, Vec<String>)> {
        let (reached, parent) = self.bfs(id, max_hops, petgraph::Direction::Outgoing);
        reached
            .into_iter()
            .map(|(m, d)| {
                let mut path = vec![self.graph[m].id.clone()];
                let mut at = m;
                while let Some(&p) = parent.get(&at) {
                    path.push(self.graph[p].id.clone());
                    at = p;
                }
                path.reverse();
                (self.graph[m].id.clone(), d, path)
            })
            .collect()
    }

    /// Resources from which `id` is reachable in at most `max_hops` hops (not `id` itself),
    /// sorted.
    pub fn upstream(&self, id: &str, max_hops: usize) -> Vec<String> {
        let (reached, _) = self.bfs(id, max_hops, petgraph::Direction::Incoming);
        let mut out: Vec<String> = reached
            .into_iter()
            .map(|(m, _)| self.graph[m].id.clone())
            .collect();
        out.sort();
        out
    }

    /// Number of resources downstream of `id` (any distance): the reach of an action on it.
    pub fn downstream_count(&self, id: &str) -> usize {
        self.bfs(id, usize::MAX, petgraph::Direction::Outgoing)
            .0
            .len()
    }

    /// Every resource id, sorted.
    pub fn ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.index.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
[[resource]]
id = "net"
type = "network"
[[resource]]
id = "vm"
type = "vm"
[[resource]]
id = "db"
type = "database"
service = "orders"
[[resource]]
id = "app"
type = "application"
[[edge]]
from = "vm"
to = "db"
[[edge]]
from = "db"
to = "app"
[[edge]]
from = "net"
to = "*"
"#;

    #[test]
    fn parses_and_walks() {
        let t = Topology::parse("t.toml", TOML).unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t.resource("db").unwrap().service.as_deref(), Some("orders"));
        let down = t.downstream("vm", 3);
        assert_eq!(
            down,
            vec![
                ("db".to_string(), 1, vec!["vm".to_string(), "db".into()]),
                (
                    "app".to_string(),
                    2,
                    vec!["vm".to_string(), "db".into(), "app".into()]
                ),
            ]
        );
        assert_eq!(t.downstream("vm", 1).len(), 1);
        assert_eq!(t.downstream_count("net"), 3);
        let json = r#"{"resource":[{"id":"a","type":"vm"},{"id":"b","type":"disk"}],"edge":[{"from":"a","to":"b"}]}"#;
        assert_eq!(
            Topology::parse("t.json", json)
                .unwrap()
                .downstream_count("a"),
            1
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let bad = r#"
[[resource]]
id = "a"
type = "vm"
[[resource]]
id = "a"
type = "vm"
[[edge]]
from = "a"
to = "ghost"
[[edge]]
from = "a"
to = "a"
"#;
        let e = Topology::parse("t.toml", bad).unwrap_err();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(
            lines,
            [
                "t.toml: resource 2: duplicate id `a`",
                "t.toml: edge 1 (a → ghost): unknown resource `ghost`",
                "t.toml: edge 2 (a → a): a resource cannot depend on itself",
            ]
        );
        let e = Topology::parse(
            "t.toml",
            "[[resource]]\nid = \"a\"\ntype = \"vm\"\ncolour = 1\n",
        )
        .unwrap_err();
        assert!(e.contains("colour"), "{e}");
    }
}

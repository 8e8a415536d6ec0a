//! The stage DAG: edges come from references between stages. Order, cycles, selection
//! (`--only`, `--until`, `--force`) and drawing (`pipe dag`).

use std::collections::BTreeSet;
use std::fmt::Write;

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;

use crate::spec::Pipeline;

/// The DAG of a pipeline; node `i` is `pipeline.stages[i]`, edges point downstream.
pub struct Dag {
    pub graph: DiGraph<usize, ()>,
}

impl Dag {
    pub fn new(p: &Pipeline) -> Self {
        let mut graph = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..p.stages.len()).map(|i| graph.add_node(i)).collect();
        for (i, s) in p.stages.iter().enumerate() {
            for up in s.upstream() {
                let j = p.index(up).expect("references are checked when parsing");
                graph.update_edge(nodes[j], nodes[i], ());
            }
        }
        Dag { graph }
    }

    /// Stage indices in an order where every stage comes after what it reads; ties keep file
    /// order, so plans and tables read the way the file does.
    pub fn order(&self) -> Vec<usize> {
        let n = self.graph.node_count();
        let mut indegree: Vec<usize> = (0..n)
            .map(|i| {
                self.graph
                    .neighbors_directed(NodeIndex::new(i), Direction::Incoming)
                    .count()
            })
            .collect();
        let mut ready: BTreeSet<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
        let mut out = Vec::with_capacity(n);
        while let Some(i) = ready.pop_first() {
            out.push(i);
            for d in self
                .graph
                .neighbors_directed(NodeIndex::new(i), Direction::Outgoing)
            {
                indegree[d.index()] -= 1;
                if indegree[d.index()] == 0 {
                    ready.insert(d.index());
                }
            }
        }
        debug_assert!(toposort(&self.graph, None).is_ok());
        out
    }

    /// The stages `i` reads from, in file order.
    pub fn upstream(&self, i: usize) -> Vec<usize> {
        self.neighbors(i, Direction::Incoming)
    }

    /// The stages that read from `i`, in file order.
    pub fn downstream(&self, i: usize) -> Vec<usize> {
        self.neighbors(i, Direction::Outgoing)
    }

    fn neighbors(&self, i: usize, dir: Direction) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .graph
            .neighbors_directed(NodeIndex::new(i), dir)
            .map(|n| n.index())
            .collect();
        v.sort();
        v
    }

    /// `i` and everything it depends on, transitively.
    pub fn ancestors(&self, i: usize) -> BTreeSet<usize> {
        self.reach(i, Direction::Incoming)
    }

    /// `i` and everything that depends on it, transitively.
    pub fn descendants(&self, i: usize) -> BTreeSet<usize> {
        self.reach(i, Direction::Outgoing)
    }

    fn reach(&self, i: usize, dir: Direction) -> BTreeSet<usize> {
        let mut seen = BTreeSet::from([i]);
        let mut stack = vec![i];
        while let Some(n) = stack.pop() {
            for m in self.graph.neighbors_directed(NodeIndex::new(n), dir) {
                if seen.insert(m.index()) {
                    stack.push(m.index());
                }
            }
        }
        seen
    }
}

/// A cycle of stage ids (each reads the next's output… back to the first), if there is one.
pub fn find_cycle(p: &Pipeline) -> Option<Vec<String>> {
    let dag = Dag::new(p);
    for scc in tarjan_scc(&dag.graph) {
        let self_loop = scc.len() == 1 && dag.graph.contains_edge(scc[0], scc[0]);
        if scc.len() < 2 && !self_loop {
            continue;
        }
        // The shortest walk from the component's first stage (in file order) back to itself
        // along "reads from" edges.
        let members: BTreeSet<usize> = scc.iter().map(|n| n.index()).collect();
        let start = *members.first().expect("non-empty");
        let mut parent: std::collections::BTreeMap<usize, usize> = Default::default();
        let mut queue = std::collections::VecDeque::from([start]);
        let mut last = None;
        'bfs: while let Some(n) = queue.pop_front() {
            for u in dag.upstream(n) {
                if !members.contains(&u) {
                    continue;
                }
                if u == start {
                    last = Some(n);
                    break 'bfs;
                }
                if let std::collections::btree_map::Entry::Vacant(e) = parent.entry(u) {
                    e.insert(n);
                    queue.push_back(u);
                }
            }
        }
        let mut cycle = vec![];
        let mut cur = last?;
        while cur != start {
            cycle.push(cur);
            cur = parent[&cur];
        }
        cycle.push(start);
        cycle.reverse();
        return Some(cycle.into_iter().map(|i| p.stages[i].id.clone()).collect());
    }
    None
}

/// Which stages a run covers and which it must re-run.
#[derive(Debug, Default, Clone)]
pub struct Selection {
    /// Run only these stages (their inputs must already be in the cache).
    pub only: Vec<String>,
    /// Run these stages and what they depend on, nothing downstream.
    pub until: Vec<String>,
    /// Re-run these and everything downstream of them even if cached.
    pub force: Vec<String>,
}

/// The stages a selection covers, and those it forces.
pub struct Plan {
    pub selected: BTreeSet<usize>,
    pub forced: BTreeSet<usize>,
}

impl Selection {
    pub fn plan(&self, p: &Pipeline, dag: &Dag) -> Result<Plan, String> {
        let idx = |id: &str| {
            p.index(id).ok_or_else(|| {
                let ids: Vec<&str> = p.stages.iter().map(|s| s.id.as_str()).collect();
                format!(
                    "the pipeline has no stage `{id}` (stages: {})",
                    ids.join(", ")
                )
            })
        };
        let mut selected: BTreeSet<usize> = if self.only.is_empty() && self.until.is_empty() {
            (0..p.stages.len()).collect()
        } else {
            BTreeSet::new()
        };
        for id in &self.only {
            selected.insert(idx(id)?);
        }
        for id in &self.until {
            selected.extend(dag.ancestors(idx(id)?));
        }
        let mut forced = BTreeSet::new();
        for id in &self.force {
            forced.extend(dag.descendants(idx(id)?));
        }
        Ok(Plan { selected, forced })
    }
}

/// `pipe dag` output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DagFormat {
    Text,
    Mermaid,
    Dot,
}

/// Draws the DAG: an indented list, a Mermaid flowchart or a Graphviz digraph.
pub fn render(p: &Pipeline, format: DagFormat) -> String {
    let dag = Dag::new(p);
    let mut out = String::new();
    match format {
        DagFormat::Text => {
            for i in dag.order() {
                let s = &p.stages[i];
                let ups: Vec<&str> = dag
                    .upstream(i)
                    .into_iter()
                    .map(|u| p.stages[u].id.as_str())
                    .collect();
                if ups.is_empty() {
                    let _ = writeln!(out, "{} ({})", s.id, s.kind);
                } else {
                    let _ = writeln!(out, "{} ({}) <- {}", s.id, s.kind, ups.join(", "));
                }
            }
        }
        DagFormat::Mermaid => {
            out.push_str("flowchart TD\n");
            for s in &p.stages {
                let _ = writeln!(out, "    {}[\"{} ({})\"]", mermaid_id(&s.id), s.id, s.kind);
            }
            for e in dag.graph.edge_indices() {
                let (a, b) = dag.graph.edge_endpoints(e).expect("edge");
                let _ = writeln!(
                    out,
                    "    {} --> {}",
                    mermaid_id(&p.stages[a.index()].id),
                    mermaid_id(&p.stages[b.index()].id)
                );
            }
        }
        DagFormat::Dot => {
            let _ = writeln!(out, "digraph \"{}\" {{", p.name.replace('"', "\\\""));
            out.push_str("    rankdir=TB;\n    node [shape=box];\n");
            for s in &p.stages {
                let _ = writeln!(out, "    \"{}\" [label=\"{}\\n({})\"];", s.id, s.id, s.kind);
            }
            for e in dag.graph.edge_indices() {
                let (a, b) = dag.graph.edge_endpoints(e).expect("edge");
                let _ = writeln!(
                    out,
                    "    \"{}\" -> \"{}\";",
                    p.stages[a.index()].id,
                    p.stages[b.index()].id
                );
            }
            out.push_str("}\n");
        }
    }
    out
}

fn mermaid_id(id: &str) -> String {
    id.replace('-', "_")
}

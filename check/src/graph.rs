//! Dependency edges between committed transactions and the search for forbidden cycles.
//!
//! Under snapshot isolation with first-committer-wins, a ww or wr edge `a -> b` means `a`
//! committed before `b` started, and an rw edge `a -> b` means `a` started before `b`
//! committed. So a non-rw edge followed by an rw edge still moves strictly forward in commit
//! time, and any closed walk in which no two rw edges are adjacent (wrapping around) would
//! need commit time to increase all the way round: that is the forbidden shape. Walks with
//! adjacent rw edges (write skew) are allowed.
//!
//! Tarjan's algorithm prunes the search to strongly connected components; a breadth-first
//! search then extracts one short cycle per component, which keeps the whole check linear in
//! the size of the graph.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::history::Analysis;
use crate::report::{Anomaly, CycleKind, EdgeCounts, EdgeKind, Step};
use crate::{Key, Txn};

/// An edge between transactions, by index in the history.
#[derive(Debug, Clone, Copy)]
struct Edge {
    from: usize,
    to: usize,
    kind: EdgeKind,
    key: Key,
}

/// Adjacency lists of `(target node, edge id)`; several views share one edge list.
type Adjacency = Vec<Vec<(usize, usize)>>;

/// The dependency graph of a history's committed transactions.
pub(crate) struct DependencyGraph<'h> {
    history: &'h [Txn],
    edges: Vec<Edge>,
}

impl<'h> DependencyGraph<'h> {
    /// Infers ww, wr and rw edges from the version orders and committed reads. Only appends a
    /// committed read observed have a known position, so only they create edges.
    pub(crate) fn build(history: &'h [Txn], analysis: &Analysis<'_>) -> Self {
        let mut builder = Builder {
            analysis,
            seen: HashSet::new(),
            edges: Vec::new(),
        };
        for (&key, order) in &analysis.orders {
            for pair in order.windows(2) {
                if let [a, b] = *pair {
                    builder.add(
                        builder.writer(key, a),
                        builder.writer(key, b),
                        EdgeKind::Ww,
                        key,
                    );
                }
            }
        }
        for read in &analysis.reads {
            let observed = read.list.get(..read.external).unwrap_or_default();
            if let Some(&last) = observed.last() {
                builder.add(
                    builder.writer(read.key, last),
                    Some(read.txn),
                    EdgeKind::Wr,
                    read.key,
                );
            }
            // The anti-dependency needs the read's place in the order, so the observed
            // version must be a prefix of it; a read that is not has been reported already.
            let Some(order) = analysis.orders.get(&read.key) else {
                continue;
            };
            if order.starts_with(observed)
                && let Some(&next) = order.get(read.external)
            {
                builder.add(
                    Some(read.txn),
                    builder.writer(read.key, next),
                    EdgeKind::Rw,
                    read.key,
                );
            }
        }
        DependencyGraph {
            history,
            edges: builder.edges,
        }
    }

    pub(crate) fn edge_counts(&self) -> EdgeCounts {
        let mut counts = EdgeCounts::default();
        for edge in &self.edges {
            match edge.kind {
                EdgeKind::Ww => counts.ww += 1,
                EdgeKind::Wr => counts.wr += 1,
                EdgeKind::Rw => counts.rw += 1,
            }
        }
        counts
    }

    /// One forbidden cycle per strongly connected component of each kind: G0 among ww edges,
    /// G1c among ww and wr edges, and G-single or G-nonadjacent in the full graph.
    pub(crate) fn cycles(&self) -> Vec<Anomaly> {
        let nodes = self.history.len();
        let kind_is = |kind: EdgeKind| move |id: usize| self.edge_kind(id) == Some(kind);
        let mut found = Vec::new();

        let ww = self.adjacency(nodes, |e| e.kind == EdgeKind::Ww);
        for walk in cycle_per_component(&ww, |_| true) {
            found.push(self.report(CycleKind::G0, &walk));
        }

        // Cycles of ww edges alone are G0 above; G1c needs information flowing through a read.
        let wwr = self.adjacency(nodes, |e| e.kind != EdgeKind::Rw);
        for walk in cycle_per_component(&wwr, kind_is(EdgeKind::Wr)) {
            found.push(self.report(CycleKind::G1c, &walk));
        }

        // Node 2t is transaction t reached by a non-rw edge, 2t+1 reached by an rw edge; an
        // rw edge may only leave the former, so no closed walk here has two rw edges in a
        // row, not even across the wrap-around.
        let mut product: Adjacency = vec![Vec::new(); 2 * nodes];
        for (id, edge) in self.edges.iter().enumerate() {
            if edge.kind == EdgeKind::Rw {
                if let Some(out) = product.get_mut(2 * edge.from) {
                    out.push((2 * edge.to + 1, id));
                }
                continue;
            }
            for state in [0, 1] {
                if let Some(out) = product.get_mut(2 * edge.from + state) {
                    out.push((2 * edge.to, id));
                }
            }
        }
        // Walks through an rw edge only: those without one are G0 or G1c above.
        for walk in cycle_per_component(&product, kind_is(EdgeKind::Rw)) {
            let walk = self.shorten(walk);
            let rw = walk.iter().filter(|&&id| kind_is(EdgeKind::Rw)(id)).count();
            let kind = if rw == 1 {
                CycleKind::GSingle
            } else {
                CycleKind::GNonadjacent
            };
            found.push(self.report(kind, &walk));
        }
        found
    }

    fn edge_kind(&self, id: usize) -> Option<EdgeKind> {
        self.edges.get(id).map(|e| e.kind)
    }

    /// The subgraph of the edges matching `keep`.
    fn adjacency(&self, nodes: usize, keep: impl Fn(&Edge) -> bool) -> Adjacency {
        let mut adjacency: Adjacency = vec![Vec::new(); nodes];
        for (id, edge) in self.edges.iter().enumerate().filter(|(_, e)| keep(e)) {
            if let Some(out) = adjacency.get_mut(edge.from) {
                out.push((edge.to, id));
            }
        }
        adjacency
    }

    /// A shortest path in the product graph may pass a transaction twice (once per state).
    /// Splitting the walk there often leaves a simple cycle that is still forbidden, which is
    /// easier for a person to follow; if neither half is, the walk itself is the evidence.
    fn shorten(&self, mut walk: Vec<usize>) -> Vec<usize> {
        'restart: loop {
            let mut first_at: HashMap<usize, usize> = HashMap::new();
            for (j, id) in walk.iter().enumerate() {
                let Some(edge) = self.edges.get(*id) else {
                    return walk;
                };
                let Some(&i) = first_at.get(&edge.from) else {
                    first_at.insert(edge.from, j);
                    continue;
                };
                let inner = walk.get(i..j).unwrap_or_default().to_vec();
                let mut outer = walk.get(j..).unwrap_or_default().to_vec();
                outer.extend_from_slice(walk.get(..i).unwrap_or_default());
                for half in [inner, outer] {
                    if self.forbidden(&half) {
                        walk = half;
                        continue 'restart;
                    }
                }
            }
            return walk;
        }
    }

    /// Whether a closed walk has an rw edge and no two cyclically adjacent ones.
    fn forbidden(&self, walk: &[usize]) -> bool {
        let rw: Vec<bool> = walk
            .iter()
            .map(|id| self.edge_kind(*id) == Some(EdgeKind::Rw))
            .collect();
        let adjacent = rw
            .iter()
            .zip(rw.iter().cycle().skip(1))
            .any(|(a, b)| *a && *b);
        rw.contains(&true) && !adjacent
    }

    fn report(&self, kind: CycleKind, walk: &[usize]) -> Anomaly {
        let steps = walk
            .iter()
            .filter_map(|id| self.edges.get(*id))
            .map(|edge| Step {
                txn: self.history.get(edge.from).map_or(0, |t| t.id),
                edge: edge.kind,
                key: edge.key,
            })
            .collect();
        Anomaly::Cycle { kind, steps }
    }
}

struct Builder<'a, 'h> {
    analysis: &'a Analysis<'h>,
    seen: HashSet<(usize, usize, EdgeKind)>,
    edges: Vec<Edge>,
}

impl Builder<'_, '_> {
    /// The committed transaction that appended `element`, if any: aborted and phantom
    /// elements are reported on their own and take no part in dependencies.
    fn writer(&self, key: Key, element: u64) -> Option<usize> {
        let writer = *self.analysis.writers.get(&(key, element))?;
        self.analysis
            .committed
            .get(writer)
            .copied()
            .unwrap_or(false)
            .then_some(writer)
    }

    /// Adds one edge per (from, to, kind); the first key seen is enough to explain it.
    fn add(&mut self, from: Option<usize>, to: Option<usize>, kind: EdgeKind, key: Key) {
        let (Some(from), Some(to)) = (from, to) else {
            return;
        };
        let committed = |t: usize| self.analysis.committed.get(t).copied().unwrap_or(false);
        if from != to && committed(from) && committed(to) && self.seen.insert((from, to, kind)) {
            self.edges.push(Edge {
                from,
                to,
                kind,
                key,
            });
        }
    }
}

/// Tarjan's algorithm, iterative because histories of tens of thousands of transactions would
/// overflow the stack when recursing. Returns the component id of every node, and the members
/// of each component with more than one node (self-loops are never added, so only those hold
/// cycles).
fn components(adjacency: &Adjacency) -> (Vec<usize>, Vec<Vec<usize>>) {
    const UNSEEN: usize = usize::MAX;
    // Indexing below cannot fail: every target was built from a transaction index of the
    // history, below `n` (doubled, plus state, for the product graph of `2n` nodes).
    let n = adjacency.len();
    let mut index = vec![UNSEEN; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut comp = vec![UNSEEN; n];
    let mut stack = Vec::new();
    let mut calls: Vec<(usize, usize)> = Vec::new();
    let mut next_index = 0;
    let mut next_comp = 0;
    let mut nontrivial = Vec::new();
    let mut visit = |v: usize, index: &mut [usize], low: &mut [usize], stack: &mut Vec<usize>| {
        index[v] = next_index;
        low[v] = next_index;
        next_index += 1;
        stack.push(v);
    };
    for root in 0..n {
        if index[root] != UNSEEN {
            continue;
        }
        visit(root, &mut index, &mut low, &mut stack);
        on_stack[root] = true;
        calls.push((root, 0));
        while let Some(&mut (v, ref mut next_edge)) = calls.last_mut() {
            if let Some(&(w, _)) = adjacency[v].get(*next_edge) {
                *next_edge += 1;
                if index[w] == UNSEEN {
                    visit(w, &mut index, &mut low, &mut stack);
                    on_stack[w] = true;
                    calls.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            calls.pop();
            if let Some(&(parent, _)) = calls.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut members = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    comp[w] = next_comp;
                    members.push(w);
                    if w == v {
                        break;
                    }
                }
                if members.len() > 1 {
                    nontrivial.push(members);
                }
                next_comp += 1;
            }
        }
    }
    (comp, nontrivial)
}

/// For each strongly connected component, one shortest closed walk through a `wanted` edge
/// inside it, as edge ids; components without such an edge are skipped.
fn cycle_per_component(adjacency: &Adjacency, wanted: impl Fn(usize) -> bool) -> Vec<Vec<usize>> {
    let (comp, components) = components(adjacency);
    components
        .iter()
        .filter_map(|members| {
            let edge = members
                .iter()
                .find_map(|&u| edge_within(adjacency, &comp, u, &wanted))?;
            cycle_through(adjacency, &comp, edge)
        })
        .collect()
}

/// An edge from `u` that stays inside `u`'s component and satisfies `wanted`.
fn edge_within(
    adjacency: &Adjacency,
    comp: &[usize],
    u: usize,
    wanted: impl Fn(usize) -> bool,
) -> Option<(usize, usize, usize)> {
    let home = *comp.get(u)?;
    adjacency
        .get(u)?
        .iter()
        .find(|(v, id)| comp.get(*v) == Some(&home) && wanted(*id))
        .map(|&(v, id)| (u, v, id))
}

/// The edge `(u, v, id)` followed by a shortest path back from `v` to `u` inside their
/// component, as edge ids.
fn cycle_through(
    adjacency: &Adjacency,
    comp: &[usize],
    (u, v, id): (usize, usize, usize),
) -> Option<Vec<usize>> {
    let home = *comp.get(u)?;
    let mut parent: HashMap<usize, (usize, usize)> = HashMap::new();
    let mut queue = VecDeque::from([v]);
    while let Some(x) = queue.pop_front() {
        if x == u {
            let mut path = Vec::new();
            let mut at = u;
            while at != v {
                let &(prev, edge) = parent.get(&at)?;
                path.push(edge);
                at = prev;
            }
            path.push(id);
            path.reverse();
            return Some(path);
        }
        for &(y, edge) in adjacency.get(x)? {
            if y != v && comp.get(y) == Some(&home) && !parent.contains_key(&y) {
                parent.insert(y, (x, edge));
                queue.push_back(y);
            }
        }
    }
    None
}

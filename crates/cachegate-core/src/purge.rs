//! Purges by tag and of a whole namespace, recorded as markers checked at lookup (the
//! "tag versions" of FusionCache): a purge records when it happened, and an entry stored
//! before a purge that covers it is a miss from then on. A purge therefore costs the same
//! whether it covers one entry or a million, and never scans a keyspace.
//!
//! Times are milliseconds: an entry stored in the same millisecond as a purge counts as
//! purged (a miss, never a stale answer).

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::key::CacheKey;

/// The purge markers of one cache (one namespace).
#[derive(Debug, Default)]
pub struct Purges {
    /// False until the first purge: lookups skip the markers entirely.
    active: AtomicBool,
    /// Markers come from a shared store (Redis) that must be loaded before shared entries
    /// may be trusted ([`Purges::expect_sync`]).
    needs_sync: AtomicBool,
    /// The shared markers have been loaded at least once.
    synced: AtomicBool,
    state: RwLock<State>,
    /// The ids of the last purges this replica published ([`Purges::note_own`]).
    own: std::sync::Mutex<std::collections::VecDeque<u64>>,
    /// Times markers were folded into the namespace marker ([`MAX_TAG_MARKERS`]).
    folds: prometheus_client::metrics::counter::Counter,
}

/// How many of its own purge ids a replica remembers.
const OWN_IDS: usize = 64;

#[derive(Debug, Default)]
struct State {
    /// Every entry stored at or before this time (ms since the Unix epoch) is purged.
    all_at_ms: u64,
    /// Per tag: entries with the tag stored at or before this time are purged.
    tags: HashMap<String, u64>,
    /// Per path pattern: entries whose path (their `path:` tag, see [`PATH_TAG_PREFIX`])
    /// matches, stored at or before this time, are purged. Newest first, so that a lookup
    /// stops at the first marker older than its entry.
    patterns: Vec<(String, u64)>,
    /// Per cache key: the entry stored under it at or before this time is purged.
    keys: HashMap<[u8; 32], u64>,
}

/// How long a purge by key is remembered: a day. Purges by key are many (every unsafe
/// request invalidates its target, RFC 9111 §4.4), so their markers are not kept forever;
/// each replica also removes the purged keys from its memory tier when it receives the
/// purge, so a marker only matters for a replica that was away. An entry purged by key
/// and still held by a replica disconnected for longer than this may be served again.
pub const KEY_MARKER_RETENTION_MS: u64 = 24 * 3600 * 1000;

/// Key markers held at most: beyond, those older than [`KEY_MARKER_RETENTION_MS`] are
/// dropped, then the oldest, down to three quarters. (A replica that missed a purge by key
/// whose marker was dropped may serve that entry until it expires.)
pub const MAX_KEY_MARKERS: usize = 100_000;

/// Tag markers held at most: beyond, the oldest are folded into the namespace marker
/// ([`Purges::purge_all`] at the newest folded marker's time), down to three quarters.
/// Folding never serves a purged entry again: every entry stored at or before that time
/// becomes a miss (for soft markers, stale), whatever its tags. Operators that purge by
/// per-entity tags (`user:123`) would otherwise grow the markers, and the time a replica
/// takes to load them, without end.
pub const MAX_TAG_MARKERS: usize = 50_000;

/// Path-pattern markers held at most; beyond, folded as tag markers are
/// ([`MAX_TAG_MARKERS`]). A lookup checks the patterns newer than its entry.
pub const MAX_PATTERN_MARKERS: usize = 1_000;

/// Tag, path and soft key markers recorded in Redis at most (the hash
/// `{namespace}:purges`, hard and soft together); beyond, the oldest are folded into its
/// namespace markers there the same way ([`MAX_TAG_MARKERS`]).
pub const MAX_SHARED_MARKERS: usize = 50_000;

/// The prefix of the tag an entry's request path is stored in, for purges by path
/// pattern: `path:/kpi/leads`.
pub const PATH_TAG_PREFIX: &str = "path:";

/// Whether `path` matches `pattern`, a glob anchored to the whole path where `*` matches
/// any run of characters (`/` included) and every other character itself.
///
/// ```
/// use cachegate_core::purge::glob_matches;
/// assert!(glob_matches("/kpi/leads/*", "/kpi/leads/eu"));
/// assert!(!glob_matches("/kpi/leads/*", "/kpi/leads-archive/x"));
/// assert!(!glob_matches("/kpi/leads/*", "/api/kpi/leads/x"));
/// assert!(glob_matches("/kpi/*/daily", "/kpi/eu/x/daily"));
/// ```
pub fn glob_matches(pattern: &str, path: &str) -> bool {
    // In time linear in the lengths (a lookup checks every pattern purged after its entry
    // was stored, so a backtracking matcher would let one pattern cost seconds per hit):
    // the text before the first `*` is a prefix, the text after the last one a suffix,
    // and the pieces between are found left to right, each at its first place (taking
    // the first place never loses a match: a `*` takes any run).
    let Some(first) = pattern.find('*') else {
        return pattern == path;
    };
    let last = pattern.rfind('*').unwrap_or(first);
    let (head, tail) = (&pattern[..first], &pattern[last + 1..]);
    let middle = if last > first {
        &pattern[first + 1..last]
    } else {
        ""
    };
    let Some(rest) = path.strip_prefix(head) else {
        return false;
    };
    let Some(mut rest) = rest.strip_suffix(tail) else {
        return false;
    };
    for piece in middle.split('*').filter(|p| !p.is_empty()) {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

/// The time to fold at so that at most `keep` of the marker times in `times` stay (those
/// strictly newer): the newest of the oldest `times.len() - keep`. Markers sharing that
/// time fold together, so fewer may stay.
fn fold_floor(times: &mut [u64], keep: usize) -> u64 {
    let cut = times.len().saturating_sub(keep).max(1);
    let (_, floor, _) = times.select_nth_unstable(cut - 1);
    *floor
}

impl Purges {
    /// Records a purge of every entry tagged with any of `tags`, at `at_ms` (milliseconds
    /// since the Unix epoch). A later marker for a tag replaces an earlier one.
    pub fn purge_tags<S: AsRef<str>>(&self, tags: &[S], at_ms: u64) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        for tag in tags {
            let at = state.tags.entry(tag.as_ref().to_string()).or_default();
            *at = (*at).max(at_ms);
        }
        if state.tags.len() > MAX_TAG_MARKERS {
            let mut markers: Vec<u64> = state.tags.values().copied().collect();
            let floor = fold_floor(&mut markers, MAX_TAG_MARKERS / 4 * 3);
            state.tags.retain(|_, at| *at > floor);
            self.fold(&mut state, floor, "tag");
        }
        self.active.store(true, Ordering::Release);
    }

    /// Records a purge of every entry whose path matches any of `patterns`
    /// ([`glob_matches`]), at `at_ms`.
    pub fn purge_paths<S: AsRef<str>>(&self, patterns: &[S], at_ms: u64) {
        self.purge_paths_at(patterns.iter().map(|p| (p.as_ref(), at_ms)));
    }

    /// Records purges by path pattern, each at its own time (`(pattern, at_ms)`), as
    /// [`Purges::purge_paths`] does: one pass whatever their number (markers loaded from
    /// a shared store come this way).
    pub fn purge_paths_at<'a>(&self, purges: impl IntoIterator<Item = (&'a str, u64)>) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let mut latest: HashMap<String, u64> = state.patterns.drain(..).collect();
        for (pattern, at_ms) in purges {
            let at = latest.entry(pattern.to_string()).or_default();
            *at = (*at).max(at_ms);
        }
        state.patterns = latest.into_iter().collect();
        state
            .patterns
            .sort_unstable_by_key(|(_, at)| std::cmp::Reverse(*at));
        if state.patterns.len() > MAX_PATTERN_MARKERS {
            let mut markers: Vec<u64> = state.patterns.iter().map(|(_, at)| *at).collect();
            let floor = fold_floor(&mut markers, MAX_PATTERN_MARKERS / 4 * 3);
            state.patterns.retain(|(_, at)| *at > floor);
            self.fold(&mut state, floor, "path");
        }
        self.active.store(true, Ordering::Release);
    }

    /// Folds markers at or before `floor` (already removed from `state`) into the
    /// namespace marker.
    fn fold(&self, state: &mut State, floor: u64, kind: &'static str) {
        state.all_at_ms = state.all_at_ms.max(floor);
        self.folds.inc();
        tracing::warn!(
            kind,
            floor_ms = floor,
            "too many purge markers: the oldest folded into a purge of every entry stored by then"
        );
    }

    /// Markers that count their folds into `folds` (which keeps counting where it is).
    pub fn counting_folds(folds: prometheus_client::metrics::counter::Counter) -> Self {
        Purges {
            folds,
            ..Purges::default()
        }
    }

    /// How many times markers were folded into the namespace marker ([`MAX_TAG_MARKERS`]).
    pub fn folds(&self) -> u64 {
        self.folds.get()
    }

    /// Records a purge of the entries stored under `keys`, at `at_ms`. Key markers older
    /// than [`KEY_MARKER_RETENTION_MS`] are dropped once more than [`MAX_KEY_MARKERS`] are
    /// held.
    pub fn purge_keys(&self, keys: &[CacheKey], at_ms: u64) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        for key in keys {
            let at = state.keys.entry(key.0).or_default();
            *at = (*at).max(at_ms);
        }
        if state.keys.len() > MAX_KEY_MARKERS {
            // Down to three quarters at most, the oldest first, so that this runs once
            // per MAX_KEY_MARKERS / 4 new markers at most.
            let cutoff = crate::now_ms().saturating_sub(KEY_MARKER_RETENTION_MS);
            state.keys.retain(|_, at| *at >= cutoff);
            let keep = MAX_KEY_MARKERS / 4 * 3;
            if state.keys.len() > keep {
                // Exactly the oldest `cut` go (markers of one batch share a time).
                let mut markers: Vec<([u8; 32], u64)> =
                    state.keys.iter().map(|(k, at)| (*k, *at)).collect();
                let cut = markers.len() - keep;
                markers.select_nth_unstable_by_key(cut, |m| m.1);
                for (key, _) in &markers[..cut] {
                    state.keys.remove(key);
                }
            }
        }
        self.active.store(true, Ordering::Release);
    }

    /// Whether a purge by key covers the entry stored under `key` at `stored_at_ms`.
    pub fn covers_key(&self, key: &CacheKey, stored_at_ms: u64) -> bool {
        if !self.active.load(Ordering::Acquire) {
            return false;
        }
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.keys.get(&key.0).is_some_and(|&at| stored_at_ms <= at)
    }

    /// Records a purge of every entry, at `at_ms`.
    pub fn purge_all(&self, at_ms: u64) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.all_at_ms = state.all_at_ms.max(at_ms);
        self.active.store(true, Ordering::Release);
    }

    /// Whether an entry stored at `stored_at_ms` with the tags `has_tag` can enumerate is
    /// purged. `has_tag` is called with a predicate and answers whether any tag satisfies
    /// it.
    pub fn covers(
        &self,
        stored_at_ms: u64,
        has_tag: impl FnOnce(&mut dyn FnMut(&str) -> bool) -> bool,
    ) -> bool {
        if !self.active.load(Ordering::Acquire) {
            return false;
        }
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        if stored_at_ms <= state.all_at_ms {
            return true;
        }
        if state.tags.is_empty() && state.patterns.is_empty() {
            return false;
        }
        has_tag(&mut |tag| {
            if state.tags.get(tag).is_some_and(|&at| stored_at_ms <= at) {
                return true;
            }
            let Some(path) = tag.strip_prefix(PATH_TAG_PREFIX) else {
                return false;
            };
            state
                .patterns
                .iter()
                .take_while(|(_, at)| stored_at_ms <= *at)
                .any(|(pattern, _)| glob_matches(pattern, path))
        })
    }

    /// Remembers that this replica published purge `id` (and has applied it already).
    pub fn note_own(&self, id: u64) {
        let mut own = self.own.lock().unwrap_or_else(|e| e.into_inner());
        if own.len() == OWN_IDS {
            own.pop_front();
        }
        own.push_back(id);
    }

    /// Whether purge `id` was published by this replica ([`Purges::note_own`]).
    pub fn is_own(&self, id: u64) -> bool {
        self.own
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
    }

    /// Declares that markers also live in a shared store: until [`Purges::mark_synced`],
    /// [`Purges::trusted`] is false.
    pub fn expect_sync(&self) {
        self.needs_sync.store(true, Ordering::Release);
    }

    /// The shared markers are loaded.
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    /// Whether entries from the shared store may be served: the markers that could cover
    /// them are known (always true when there is no shared store).
    pub fn trusted(&self) -> bool {
        !self.needs_sync.load(Ordering::Acquire) || self.synced.load(Ordering::Acquire)
    }

    /// Forgets markers older than `before_ms`: no entry stored before then can still be
    /// kept (callers pass now minus the longest TTL plus grace).
    pub fn prune(&self, before_ms: u64) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.tags.retain(|_, at| *at >= before_ms);
        state.patterns.retain(|(_, at)| *at >= before_ms);
        state.keys.retain(|_, at| *at >= before_ms);
    }

    /// Markers held (tags), for metrics and tests.
    pub fn tag_markers(&self) -> usize {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .tags
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagged<'a>(tags: &'a [&'a str]) -> impl FnOnce(&mut dyn FnMut(&str) -> bool) -> bool + 'a {
        move |pred| tags.iter().any(|t| pred(t))
    }

    #[test]
    fn path_patterns_match_the_path_tag_only() {
        let p = Purges::default();
        p.purge_paths(&["/kpi/leads/*"], 200);
        assert!(p.covers(100, tagged(&["kpi", "path:/kpi/leads/eu"])));
        assert!(!p.covers(100, tagged(&["path:/kpi/leads-archive/x"])));
        assert!(!p.covers(100, tagged(&["path:/api/kpi/leads/x"])));
        assert!(!p.covers(100, tagged(&["/kpi/leads/eu"])), "not a path tag");
        assert!(
            !p.covers(300, tagged(&["path:/kpi/leads/eu"])),
            "stored later"
        );
    }

    proptest::proptest! {
        #[test]
        fn a_pattern_without_stars_matches_only_itself(a in "[a-z/]{0,12}", b in "[a-z/]{0,12}") {
            proptest::prop_assert_eq!(glob_matches(&a, &b), a == b);
            proptest::prop_assert!(glob_matches("*", &b));
            let prefix = format!("{a}*");
            proptest::prop_assert_eq!(glob_matches(&prefix, &b), b.starts_with(&a));
        }

        /// The linear matcher answers as the textbook backtracking one, on small
        /// alphabets where stars, repeats and overlaps abound.
        #[test]
        fn the_linear_matcher_agrees_with_backtracking(p in "[ab*/]{0,10}", s in "[ab/]{0,14}") {
            proptest::prop_assert_eq!(glob_matches(&p, &s), backtracking(&p, &s), "{:?} {:?}", p, s);
        }
    }

    /// Glob matching by backtracking over the last `*` (exponential-free but quadratic):
    /// the reference [`glob_matches`] is checked against.
    fn backtracking(pattern: &str, path: &str) -> bool {
        let (p, s) = (pattern.as_bytes(), path.as_bytes());
        let (mut pi, mut si) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while si < s.len() {
            if pi < p.len() && p[pi] == b'*' {
                star = Some((pi, si));
                pi += 1;
            } else if pi < p.len() && p[pi] == s[si] {
                pi += 1;
                si += 1;
            } else if let Some((star_pi, star_si)) = star {
                pi = star_pi + 1;
                si = star_si + 1;
                star = Some((star_pi, star_si + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == b'*')
    }

    /// A pattern built to make a backtracking matcher quadratic costs one pass.
    #[test]
    fn a_hostile_pattern_is_matched_in_linear_time() {
        let path = format!("/kpi/{}", "a".repeat(200_000));
        let pattern = format!("/kpi/*{}b*", "a".repeat(100_000));
        let started = std::time::Instant::now();
        assert!(!glob_matches(&pattern, &path));
        assert!(glob_matches(
            &format!("/kpi/*{}*", "a".repeat(100_000)),
            &path
        ));
        // Quadratic would be ~10^10 steps: minutes, not this.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    proptest::proptest! {
        /// Patterns kept newest first and checked until the first older than the entry
        /// answer as every pattern's latest purge checked one by one would.
        #[test]
        fn path_markers_cover_as_their_latest_purge_says(
            purges in proptest::collection::vec((0..4usize, 0..100u64), 0..12),
            path in 0..4usize,
            stored_at in 1..110u64,
        ) {
            const PATTERNS: [&str; 4] = ["/a/*", "/a/b/*", "/*/c", "/d"];
            const PATHS: [&str; 4] = ["/a/x", "/a/b/c", "/d", "/e/c"];
            let p = Purges::default();
            let mut latest = [None::<u64>; 4];
            for &(i, at) in &purges {
                p.purge_paths(&[PATTERNS[i]], at);
                latest[i] = Some(latest[i].map_or(at, |l| l.max(at)));
            }
            let expected = (0..4).any(|i| {
                latest[i].is_some_and(|at| stored_at <= at && glob_matches(PATTERNS[i], PATHS[path]))
            });
            let tag = format!("{PATH_TAG_PREFIX}{}", PATHS[path]);
            proptest::prop_assert_eq!(p.covers(stored_at, tagged(&[tag.as_str()])), expected);
        }
    }

    #[test]
    fn tag_markers_beyond_the_cap_fold_into_the_namespace_marker() {
        let p = Purges::default();
        let n = MAX_TAG_MARKERS as u64;
        for i in 0..n {
            p.purge_tags(&[format!("t{i}")], 1_000 + i);
        }
        assert_eq!((p.tag_markers(), p.folds()), (MAX_TAG_MARKERS, 0));
        p.purge_tags(&["newest"], 1_000 + n);
        assert_eq!(p.folds(), 1);
        let kept = p.tag_markers();
        assert!(kept <= MAX_TAG_MARKERS / 4 * 3, "{kept}");
        let floor = 1_000 + n - kept as u64;
        // What was folded stays purged, with every other entry stored by then.
        assert!(p.covers(1_000, tagged(&["t0"])));
        assert!(p.covers(floor, tagged(&["never-purged"])));
        assert!(!p.covers(floor + 1, tagged(&["never-purged"])));
        // What was kept still covers exactly what it did.
        assert!(p.covers(1_000 + n, tagged(&["newest"])));
        assert!(p.covers(floor + 1, tagged(&[format!("t{}", n - 1).as_str()])));
        assert!(!p.covers(1_001 + n, tagged(&["newest"])));
    }

    #[test]
    fn path_markers_beyond_the_cap_fold_into_the_namespace_marker() {
        let p = Purges::default();
        let n = MAX_PATTERN_MARKERS as u64;
        for i in 0..=n {
            p.purge_paths(&[format!("/p/{i}/*")], 1_000 + i);
        }
        assert_eq!(p.folds(), 1);
        assert!(p.covers(1_000, tagged(&["path:/p/0/x"])), "folded");
        assert!(p.covers(1_000 + n, tagged(&["path:/p/1000/x"])), "kept");
        assert!(!p.covers(1_001 + n, tagged(&["path:/p/1000/x"])));
        assert!(
            !p.covers(1_000 + n, tagged(&["path:/q"])),
            "newer than the floor"
        );
    }

    #[test]
    fn entries_stored_before_a_purge_are_covered_later_ones_not() {
        let p = Purges::default();
        assert!(!p.covers(100, tagged(&["leads"])));
        p.purge_tags(&["leads"], 200);
        assert!(p.covers(100, tagged(&["kpi", "leads"])));
        assert!(p.covers(200, tagged(&["leads"])));
        assert!(!p.covers(201, tagged(&["leads"])), "stored after the purge");
        assert!(!p.covers(100, tagged(&["overview"])), "another tag");
        p.purge_all(300);
        assert!(p.covers(250, tagged(&[])));
        assert!(!p.covers(301, tagged(&["leads"])));
        p.prune(250);
        assert_eq!(p.tag_markers(), 0);
        assert!(p.covers(250, tagged(&[])), "the namespace marker stays");
    }
}

//! The node's side of secure-aggregation rounds in memory: one-off rounds
//! from admission to unmasking, and a run's sessions (keys, confirmation,
//! one masked input per round); secrets and rows kept only while used.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(super) use ghx_learn::federated::Phase;
use ghx_secagg::{
    Advertise, Client, EncryptedShare, MaskedInput, RoundParams, SessionClient, SessionKeys,
    Unmasking,
};
use ghx_study::training::TrainingSpec;

use super::Error;
use super::extract::{Extracted, Standardised};

/// Checks that keys advertised as `node`'s in `round` (a round or a
/// session), whose signed form is `statement`, were signed by that node
/// with the key of `certificate_pem`, a node certificate of the federation
/// valid now.
pub fn check_keys(
    members: &ghx_pki::signed::MemberKeys,
    round: &str,
    node: &str,
    statement: &[u8],
    (certificate_pem, signature): (&str, &[u8]),
) -> Result<(), Error> {
    members
        .verify_node(node, certificate_pem, statement, signature)
        .map_err(|reason| Error::UnvouchedKeys {
            round: round.to_owned(),
            node: node.to_owned(),
            reason,
        })
}

struct Session {
    client: Client,
    origin: RoundOrigin,
    work: Arc<RoundWork>,
    /// Set when step 3 begins: a round computes and releases once.
    computing: bool,
    expires: Instant,
}

/// What step 1 admitted a round to compute, for step 3: the round's phase,
/// the training and its rows, and what a noised round is charged under.
pub struct RoundWork {
    pub phase: Phase,
    pub spec: TrainingSpec,
    pub data: Arc<Extracted>,
    /// The rows standardised for the models sent, kept across a session's
    /// rounds.
    pub standardised: Standardised,
    pub min_cell_size: u32,
    pub claims: ghx_study::capability::Claims,
    pub manifest: Arc<ghx_study::manifest::StudyManifest>,
    /// An evaluation (a run's or an external validation): the epsilon its
    /// counts are noised at and charged.
    pub validation: Option<f64>,
    /// The run the round or session belongs to; empty outside a run.
    pub run: String,
}

/// What a round was admitted under at step 1, for the steps after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundOrigin {
    pub study: String,
    /// The capability (`jti`) of step 1.
    pub capability: String,
    /// Hex SHA-256 of the training spec the round trains.
    pub request_sha256: String,
    /// The nodes the round or session was keyed over, sorted.
    pub participants: Vec<String>,
}

/// A training run's secure-aggregation session at this node.
struct RunSession {
    client: SessionClient,
    origin: RoundOrigin,
    work: Arc<RoundWork>,
    /// The digest of the agreed keys, every member's lineage input names.
    keys_sha256: Option<ghx_study::lineage::Head>,
    /// Each member's certificate, as it vouched for its key at agreement:
    /// its confirmation is checked against it.
    certificates: BTreeMap<String, String>,
    /// Whether every member confirmed the keys this node agreed: nothing
    /// is masked before.
    confirmed: bool,
    /// How long the session lives past its last use.
    lifetime: Duration,
    expires: Instant,
}

/// Refuses a round or session this node is not a participant of.
fn check_participant(params: &RoundParams, node: &str) -> Result<(), Error> {
    if params.participants.iter().any(|p| p == node) {
        Ok(())
    } else {
        Err(Error::NotParticipant(params.round.clone()))
    }
}

/// Adds `entry` as round (or session) `id` to `map`, first dropping the
/// entries no longer `live`; refuses an id already there.
fn insert_new<S>(
    map: &Mutex<HashMap<String, S>>,
    id: String,
    entry: S,
    live: impl Fn(&S) -> bool,
) -> Result<(), Error> {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    map.retain(|_, s| live(s));
    if map.contains_key(&id) {
        return Err(Error::RoundExists(id));
    }
    map.insert(id, entry);
    Ok(())
}

/// Rounds in progress and the rows of trainings being run.
#[derive(Default)]
pub struct Rounds {
    sessions: Mutex<HashMap<String, Session>>,
    runs: Mutex<HashMap<String, RunSession>>,
    data: Mutex<HashMap<String, (Arc<Extracted>, Instant)>>,
}

/// How long extracted rows are kept after their last use.
const DATA_KEPT: Duration = Duration::from_secs(30 * 60);

impl Rounds {
    /// The training's rows under this consent context, extracted once per
    /// run and kept while rounds keep using them.
    pub fn data(
        &self,
        key: &str,
        load: impl FnOnce() -> Result<Extracted, Error>,
    ) -> Result<Arc<Extracted>, Error> {
        let now = Instant::now();
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        data.retain(|_, (_, used)| now.duration_since(*used) < DATA_KEPT);
        if let Some((rows, used)) = data.get_mut(key) {
            *used = now;
            return Ok(rows.clone());
        }
        let rows = Arc::new(load()?);
        data.insert(key.to_owned(), (rows.clone(), now));
        Ok(rows)
    }

    /// Step 1: starts the round: its keys, and what step 3 will compute.
    pub fn start(
        &self,
        params: RoundParams,
        node: &str,
        origin: &RoundOrigin,
        work: Arc<RoundWork>,
        lifetime: Duration,
    ) -> Result<Advertise, Error> {
        check_participant(&params, node)?;
        let round = params.round.clone();
        let (client, advertise) = Client::new(params, node)?;
        let now = Instant::now();
        insert_new(
            &self.sessions,
            round,
            Session {
                client,
                origin: origin.clone(),
                work,
                computing: false,
                expires: now + lifetime,
            },
            |s| s.expires > now,
        )?;
        Ok(advertise)
    }

    fn with<T>(
        &self,
        round: &str,
        step: impl FnOnce(&mut Session) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        match sessions.get_mut(round) {
            Some(s) if s.expires > Instant::now() => step(s),
            _ => {
                sessions.remove(round);
                Err(Error::NoSuchRound(round.to_owned()))
            }
        }
    }

    /// Step 2.
    pub fn share_keys(
        &self,
        round: &str,
        advertised: &[Advertise],
    ) -> Result<Vec<EncryptedShare>, Error> {
        self.with(round, |s| Ok(s.client.share_keys(advertised)?))
    }

    /// Step 3 begins: what the round computes, once. The caller computes
    /// without holding the rounds' lock, then calls [`Rounds::masked_input`].
    pub fn begin_masked(&self, round: &str) -> Result<(RoundOrigin, Arc<RoundWork>), Error> {
        self.with(round, |s| {
            if s.computing {
                return Err(Error::AlreadyComputed(round.to_owned()));
            }
            s.computing = true;
            Ok((s.origin.clone(), s.work.clone()))
        })
    }

    /// Step 3: the contribution `values`, encoded and masked.
    pub fn masked_input(
        &self,
        round: &str,
        shares: &[EncryptedShare],
        values: &[f64],
    ) -> Result<MaskedInput, Error> {
        let input = ghx_secagg::encode(values)?;
        self.with(round, |s| Ok(s.client.mask_input(shares, &input)?))
    }

    /// Opens a training run's session (admitted as a round's step 1):
    /// returns this node's key to sign and advertise.
    pub fn open_session(
        &self,
        params: RoundParams,
        node: &str,
        origin: &RoundOrigin,
        work: Arc<RoundWork>,
        lifetime: Duration,
    ) -> Result<SessionKeys, Error> {
        check_participant(&params, node)?;
        let session = params.round.clone();
        let (client, keys) = SessionClient::new(params, node)?;
        let now = Instant::now();
        insert_new(
            &self.runs,
            session,
            RunSession {
                client,
                origin: origin.clone(),
                work,
                keys_sha256: None,
                certificates: BTreeMap::new(),
                confirmed: false,
                lifetime,
                expires: now + lifetime,
            },
            |s| s.expires > now,
        )?;
        Ok(keys)
    }

    fn with_session<T>(
        &self,
        session: &str,
        step: impl FnOnce(&mut RunSession) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match runs.get_mut(session) {
            Some(s) if s.expires > now => {
                s.expires = now + s.lifetime;
                step(s)
            }
            _ => {
                runs.remove(session);
                Err(Error::NoSuchRound(session.to_owned()))
            }
        }
    }

    /// The members' keys (checked by the caller, with the `certificates`
    /// that vouched for them), once per session. The session's sums are
    /// over the nodes whose keys these are, which `check` must accept; they
    /// are the session's participants from now on. Returns what this node
    /// confirms to the others: the statement of the study, the session and
    /// the agreed keys' digest, to be signed.
    pub fn agree_session(
        &self,
        session: &str,
        keys: &[SessionKeys],
        certificates: BTreeMap<String, String>,
        check: impl FnOnce(&RoundOrigin, &[String]) -> Result<(), Error>,
    ) -> Result<Vec<u8>, Error> {
        self.with_session(session, |s| {
            let mut members: Vec<String> = keys.iter().map(|k| k.node.clone()).collect();
            members.sort();
            members.dedup();
            check(&s.origin, &members)?;
            s.client.agree(keys)?;
            s.origin.participants = members;
            let agreed: Vec<(String, Vec<u8>)> = keys
                .iter()
                .map(|k| (k.node.clone(), k.mask_key.to_vec()))
                .collect();
            let digest = ghx_study::lineage::keys_sha256(&agreed);
            s.keys_sha256 = Some(digest);
            s.certificates = certificates;
            Ok(ghx_study::lineage::agreement_statement(
                &s.origin.study,
                session,
                &digest,
            ))
        })
    }

    /// Checks, once per session, that every other member confirmed the
    /// keys this node agreed: its signature in `confirmations` (node,
    /// signature) verifies over this node's statement under the
    /// certificate that vouched for its key (pinned where configured). A
    /// coordinator that relayed different key sets to different members
    /// gets no masked input from any of them.
    pub fn confirm_session(
        &self,
        session: &str,
        this_node: &str,
        confirmations: &[(String, Vec<u8>)],
        members: &ghx_pki::signed::MemberKeys,
    ) -> Result<(), Error> {
        self.with_session(session, |s| {
            if s.confirmed {
                return Ok(());
            }
            let digest = s
                .keys_sha256
                .ok_or_else(|| Error::NotAgreed(session.to_owned()))?;
            let statement =
                ghx_study::lineage::agreement_statement(&s.origin.study, session, &digest);
            let unconfirmed = |node: &str, reason: String| Error::Unconfirmed {
                session: session.to_owned(),
                node: node.to_owned(),
                reason,
            };
            for member in s.origin.participants.iter().filter(|m| *m != this_node) {
                let signature = confirmations
                    .iter()
                    .find(|(node, _)| node == member)
                    .map(|(_, signature)| signature)
                    .ok_or_else(|| unconfirmed(member, "no confirmation was relayed".to_owned()))?;
                let certificate = s.certificates.get(member).ok_or_else(|| {
                    unconfirmed(member, "no certificate vouched for its key".to_owned())
                })?;
                members
                    .verify_node(member, certificate, &statement, signature)
                    .map_err(|reason| unconfirmed(member, reason.to_string()))?;
            }
            s.confirmed = true;
            Ok(())
        })
    }

    /// What a session's rounds compute, read without claiming a round (its
    /// lineage is checked first, so a refused request burns no number),
    /// with the digest of its agreed keys.
    pub fn session_work(
        &self,
        session: &str,
    ) -> Result<(RoundOrigin, Arc<RoundWork>, ghx_study::lineage::Head), Error> {
        self.with_session(session, |s| {
            let keys = s
                .keys_sha256
                .ok_or_else(|| Error::NotAgreed(session.to_owned()))?;
            Ok((s.origin.clone(), s.work.clone(), keys))
        })
    }

    /// Round `number` of a session begins: the number is claimed (never
    /// masked again, even if computing fails); returns what it computes.
    pub fn begin_session_round(
        &self,
        session: &str,
        number: u32,
    ) -> Result<(RoundOrigin, Arc<RoundWork>), Error> {
        self.with_session(session, |s| {
            s.client.claim(number)?;
            Ok((s.origin.clone(), s.work.clone()))
        })
    }

    /// Round `number` of a session: the contribution `values`, encoded and
    /// masked, bound to `head` (the lineage step it was computed from):
    /// members that computed from different steps never sum to anything
    /// readable.
    pub fn session_masked_input(
        &self,
        session: &str,
        number: u32,
        head: &ghx_study::lineage::Head,
        values: &[f64],
    ) -> Result<MaskedInput, Error> {
        let input = ghx_secagg::encode(values)?;
        self.with_session(session, |s| {
            Ok(s.client.mask_bound(number, head, &input)?)
        })
    }

    /// Computes the mask of a session's round `number` ahead of it, while
    /// the coordinator sums the round before: that round then only adds it.
    pub fn prepare_session_round(&self, session: &str, number: u32) {
        let _ = self.with_session(session, |s| {
            s.client.prepare(number);
            Ok(())
        });
    }

    /// Step 4, for every node the round was keyed with and no fewer, once
    /// `bind` (which binds the round's study to them) agrees; the round is
    /// over for this node afterwards.
    pub fn unmask(
        &self,
        round: &str,
        survivors: &[String],
        bind: impl FnOnce(&RoundOrigin) -> Result<(), Error>,
    ) -> Result<Unmasking, Error> {
        let out = self.with(round, |s| {
            crate::participants::check_survivors(round, &s.origin.participants, survivors)?;
            bind(&s.origin)?;
            Ok(s.client.unmask(survivors)?)
        });
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(round);
        out
    }
}

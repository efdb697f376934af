//! Loads the packet splice's TC program (proxy-ebpf/src/tc.rs) and attaches it at ingress of the
//! interfaces that carry client and broker traffic; dropping [`PacketPrograms`] detaches it.

use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use proxy_common::packet::{PacketFlowState, PacketKey, PacketLeg, PacketTotals};

use crate::dataplane::ebpf::{OBJECT, raise_memlock};

const PROGRAM: &str = "mqs_packet";
const FLOWS_MAP: &str = "mqs_pkt_flows";
const STATE_MAP: &str = "mqs_pkt_state";
const TOTALS_MAP: &str = "mqs_pkt_totals";
const EVENTS_MAP: &str = "mqs_pkt_events";

/// The maps the daemon drives: the flow table, the per-flow state, totals and end events.
pub struct PacketMaps {
    pub flows: HashMap<MapData, PacketKey, PacketLeg>,
    pub state: HashMap<MapData, u64, PacketFlowState>,
    pub totals: PerCpuArray<MapData, PacketTotals>,
    /// Taken by the end watcher.
    pub events: Option<RingBuf<MapData>>,
}

/// The loaded program, attached to its interfaces for as long as this lives.
pub struct PacketPrograms {
    _ebpf: Ebpf,
    interfaces: Vec<String>,
}

impl std::fmt::Debug for PacketPrograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketPrograms")
            .field("interfaces", &self.interfaces)
            .finish_non_exhaustive()
    }
}

impl PacketPrograms {
    /// Loads the program with a flow table of `flow_table_size` flows (two legs each) and
    /// attaches it at ingress of every interface in `interfaces`.
    pub fn load(
        interfaces: &[String],
        flow_table_size: u32,
    ) -> Result<(PacketPrograms, PacketMaps), String> {
        raise_memlock();
        let legs = flow_table_size.saturating_mul(2).max(2);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(FLOWS_MAP, legs)
            .map_max_entries(STATE_MAP, flow_table_size.max(1))
            .load(OBJECT)
            .map_err(|e| format!("loading the eBPF object: {e}"))?;
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| format!("map {name} missing from the eBPF object"))
        };
        let maps = PacketMaps {
            flows: HashMap::try_from(take(&mut ebpf, FLOWS_MAP)?).map_err(|e| e.to_string())?,
            state: HashMap::try_from(take(&mut ebpf, STATE_MAP)?).map_err(|e| e.to_string())?,
            totals: PerCpuArray::try_from(take(&mut ebpf, TOTALS_MAP)?)
                .map_err(|e| e.to_string())?,
            events: Some(
                RingBuf::try_from(take(&mut ebpf, EVENTS_MAP)?).map_err(|e| e.to_string())?,
            ),
        };
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| format!("program {PROGRAM} missing from the eBPF object"))?
            .try_into()
            .map_err(|e| format!("{PROGRAM}: {e}"))?;
        program
            .load()
            .map_err(|e| format!("{PROGRAM} refused by the kernel: {e}"))?;
        for interface in interfaces {
            program
                .attach(interface, TcAttachType::Ingress)
                .map_err(|e| format!("attaching {PROGRAM} at ingress of {interface}: {e}"))?;
        }
        Ok((
            PacketPrograms {
                _ebpf: ebpf,
                interfaces: interfaces.to_vec(),
            },
            maps,
        ))
    }
}

"""Seeded sample-data generator: file drops in the SPEC formats plus a ground-truth manifest.

With a ``KafkaPublisher`` the same records go to the three feed topics instead of files.

The funnel is bid requests -> bids -> wins (impressions) -> clicks -> conversions. On top of the
clean events it mixes in, at configurable rates, exact duplicates, malformed records, records that
break each validation rule, bot user agents and late arrivals (events dropped in a later file
than their event time belongs to). The manifest is computed here, in plain Python, from what was
written, so the tests check Spark's results against an independent count.
"""
from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import os
import random
import struct
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from decimal import Decimal

import fastavro
from tqdm import tqdm

from advertisex.parsing import bid_request_avro_schema

UTC = dt.timezone.utc
CONVERSION_TYPES = ["signup", "purchase", "install", "lead", "subscribe", "add_to_cart"]
CSV_HEADER = "event_id,timestamp,event_type,user_id,campaign_id,creative_id,impression_id,conversion_type,conversion_value,currency"

HUMAN_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.0 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 13; Pixel 7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/129.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (iPad; CPU OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (SMART-TV; Linux; Tizen 7.0) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/6.0 Chrome/94.0.4606.31 TV Safari/537.36",
]
BOT_AGENTS = [
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
    "python-requests/2.32.3",
]
SITES = [
    "news-daily.example.com", "recipes.example.org", "sports-hub.example.net", "tech-review.example.com",
    "travel-guide.example.org", "finance-now.example.com", "games-arena.example.net", "weather-today.example.com",
]
# Public /16 networks whose country the offline database knows, so country enrichment has work.
IP_NETWORKS = ["8.8", "81.2", "5.9", "1.1", "45.33", "51.15", "62.210", "77.88", "91.198", "104.16", "139.130", "185.60"]


@dataclass
class GeneratorOptions:
    impressions: int = 20_000
    seed: int = 7
    start: str = "2026-11-16"
    days: int = 2
    files_per_day: int = 4
    campaigns: int = 8
    rtb_share: float = 0.6
    bid_rate: float = 0.7
    win_rate: float = 0.5
    ctr: float = 0.02
    cvr: float = 0.1
    duplicate_rate: float = 0.01
    invalid_rate: float = 0.01
    bot_rate: float = 0.02
    late_rate: float = 0.01
    repeat_click_rate: float = 0.05
    click_before_impression_rate: float = 0.03
    view_conversion_rate: float = 0.003
    untouched_conversion_rate: float = 0.001
    gzip_every: int = 3
    corrupt_avro_files: int = 1
    # Event time covers this many seconds from ``start`` instead of ``days`` days (0: days), in the
    # same days x files_per_day file slots; clicks and conversions that would fall after it are
    # not generated. A fixed-rate run uses it so that event time advances with the clock.
    span_seconds: int = 0


@dataclass
class Manifest:
    """What the pipeline must make of the generated drops; per feed unless said otherwise."""

    options: dict
    input_records: dict = field(default_factory=Counter)
    silver: dict = field(default_factory=Counter)
    quarantined: dict = field(default_factory=Counter)
    quarantine_by_rule: dict = field(default_factory=dict)
    duplicates: dict = field(default_factory=Counter)
    ivt: dict = field(default_factory=Counter)
    late: dict = field(default_factory=Counter)
    files: dict = field(default_factory=Counter)
    gold_daily: dict = field(default_factory=dict)        # "date|campaign" -> SPEC §4 counts and sums
    bid_funnel_daily: dict = field(default_factory=dict)  # date -> bid_requests, bids, wins

    def to_json(self) -> dict:
        # dataclasses.asdict would rebuild each Counter from (key, value) pairs, counting the pairs.
        def plain(value):
            return {k: plain(v) for k, v in value.items()} if isinstance(value, dict) else value
        return {name: plain(getattr(self, name)) for name in self.__dataclass_fields__}


EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)


def _ms(ts: dt.datetime) -> dt.datetime:
    """Event times are whole milliseconds, as the feeds carry them, so the truth uses the same times."""
    return ts.replace(microsecond=ts.microsecond // 1000 * 1000)


def _epoch_ms(ts: dt.datetime) -> int:
    return (ts - EPOCH) // dt.timedelta(milliseconds=1)


def _iso(ts: dt.datetime) -> str:
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _csv_time(ts: dt.datetime) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S.") + f"{ts.microsecond // 1000:03d}"


class _Drops:
    """Collects records per file slot, then writes each slot atomically (temp name, rename)."""

    def __init__(self, root: str, feed: str, slots: int):
        self.dir = os.path.join(root, feed)
        os.makedirs(self.dir, exist_ok=True)
        self.slots: list[list] = [[] for _ in range(slots)]

    def add(self, slot: int, record) -> None:
        self.slots[max(0, min(slot, len(self.slots) - 1))].append(record)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


class Generator:
    def __init__(self, options: GeneratorOptions):
        self.o = options
        self.rng = random.Random(options.seed)
        self.start = dt.datetime.fromisoformat(options.start).replace(tzinfo=UTC)
        self.slots = options.days * options.files_per_day
        self.span = dt.timedelta(seconds=options.span_seconds) if options.span_seconds else dt.timedelta(days=options.days)
        self.slot_span = self.span / self.slots
        self.manifest = Manifest(options=asdict(options), quarantine_by_rule={
            "impressions": Counter(), "clicks_conversions": Counter(), "bid_requests": Counter()})
        self._build_world()

    # -- reference data -------------------------------------------------------------------------
    def _build_world(self) -> None:
        rng, o = self.rng, self.o
        self.creatives = []
        for c in range(1, o.campaigns + 1):
            advertiser = f"adv-{(c - 1) % 3 + 1:02d}"
            for k in range(rng.randint(2, 3)):
                fmt, w, h = rng.choice([("banner", 300, 250), ("banner", 728, 90), ("video", 640, 360), ("native", 1200, 628)])
                self.creatives.append((f"cr-{c:03d}{k + 1}", f"cmp-{c:04d}", advertiser, fmt, w, h))
        users = max(50, o.impressions // 8)
        self.users = []
        for u in range(users):
            if rng.random() < 0.1:
                ip = f"2a01:4f8:{rng.randint(0, 0xffff):x}:{rng.randint(0, 0xffff):x}::{rng.randint(1, 0xffff):x}"
            else:
                ip = f"{rng.choice(IP_NETWORKS)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
            self.users.append((f"u-{u:07d}", ip, rng.choice(HUMAN_AGENTS)))

    def _slot_of(self, ts: dt.datetime) -> int:
        return int((ts - self.start) / self.slot_span)

    def _event_time(self) -> dt.datetime:
        # Over days, the last two hours are left to the clicks and conversions that follow.
        room = self.span.total_seconds() - (0 if self.o.span_seconds else 7200)
        return _ms(self.start + dt.timedelta(seconds=self.rng.uniform(0, room)))

    def _arrival_slot(self, ts: dt.datetime, feed: str) -> int:
        slot = self._slot_of(ts)
        if self.rng.random() < self.o.late_rate:
            self.manifest.late[feed] += 1
            return slot + self.rng.randint(2, 4)
        return slot

    # -- generation -----------------------------------------------------------------------------
    def generate(self, out: str, progress: bool = True, publisher: KafkaPublisher | None = None) -> Manifest:
        """Write the drops under ``out`` or, given a ``publisher``, send the feeds to Kafka (the
        creatives dimension and the manifest are written under ``out`` either way)."""
        o, rng, m = self.o, self.rng, self.manifest
        imps = _Drops(out, "impressions", self.slots)
        events = _Drops(out, "clicks_conversions", self.slots)
        bids = _Drops(out, "bid_requests", self.slots)
        valid_imps, valid_events, valid_bids, truth_imps = [], [], [], []

        bar = tqdm(total=o.impressions, desc="generating impressions", unit="imp", disable=not progress)
        for n in range(o.impressions):
            bar.update(1)
            creative = rng.choice(self.creatives)
            user_id, ip, agent = rng.choice(self.users)
            is_bot = rng.random() < o.bot_rate
            if is_bot:
                agent = rng.choice(BOT_AGENTS)
            ts = self._event_time()
            imp = {
                "impression_id": f"imp-{n:08d}", "timestamp": _iso(ts), "creative_id": creative[0],
                "user_id": user_id, "website": self._website(), "cost": round(rng.uniform(0.0005, 0.004), 6),
                "currency": "USD", "ip": ip, "user_agent": agent,
            }
            if rng.random() < 0.5:
                imp["campaign_id"] = creative[1]
            if rng.random() < 0.1:
                imp["timestamp"] = _epoch_ms(ts)
            if rng.random() < o.rtb_share:
                imp["auction_id"] = f"auc-{n:08d}"
                valid_bids.append(self._bid_request(imp["auction_id"], ts - dt.timedelta(milliseconds=rng.randint(50, 3000)),
                                                    user_id, ip, agent, creative, won=True))
                m.ivt["bid_requests"] += is_bot
            imps.add(self._arrival_slot(ts, "impressions"), json.dumps(imp))
            valid_imps.append(imp)
            m.ivt["impressions"] += is_bot
            truth_imps.append({"id": imp["impression_id"], "ts": ts, "user": user_id, "campaign": creative[1],
                               "cost": Decimal(str(imp["cost"])), "ivt": is_bot, "auction_id": imp.get("auction_id")})
            if not is_bot and rng.random() < o.ctr:
                valid_events.extend(self._click_and_conversion(imp, ts, creative))
            elif not is_bot:
                valid_events.extend(self._unclicked_conversion(imp, ts, creative))
        bar.close()
        if self.o.span_seconds:  # what would happen after the span is not part of this feed
            valid_events = [e for e in valid_events if e["ts"] < self.start + self.span]
        self._lost_auctions(valid_bids)

        for record in valid_events:
            slot = self._arrival_slot(record["ts"], "clicks_conversions")
            events.add(slot, record["line"])
        for record in valid_bids:
            bids.add(self._arrival_slot(record["ts"], "bid_requests"), record["avro"])
        m.silver["impressions"] = len(valid_imps)
        m.silver["clicks"] = sum(1 for e in valid_events if e["type"] == "click")
        m.silver["conversions"] = sum(1 for e in valid_events if e["type"] == "conversion")
        m.silver["bid_requests"] = len(valid_bids)

        self._duplicates(imps, [json.dumps(i) for i in valid_imps], "impressions")
        self._duplicates(events, [e["line"] for e in valid_events], "clicks_conversions")
        self._duplicates(bids, [b["avro"] for b in valid_bids], "bid_requests")
        self._invalid_impressions(imps)
        self._invalid_events(events)
        self._invalid_bids(bids)

        m.gold_daily, m.bid_funnel_daily = expected_gold(truth_imps, valid_events, valid_bids)
        self.expected_ids = {
            "impressions": {i["impression_id"] for i in valid_imps},
            "clicks": {e["id"] for e in valid_events if e["type"] == "click"},
            "conversions": {e["id"] for e in valid_events if e["type"] == "conversion"},
            "bid_requests": {b["avro"]["auction_id"] for b in valid_bids},
            # clicks gold counts (not IVT once attributed: no repeat, no click before its impression)
            "counted_clicks": {c["id"] for c in _resolve_clicks(
                [dict(e) for e in valid_events if e["type"] == "click"], [i for i in truth_imps if not i["ivt"]])
                if not c["ivt"]},
        }

        os.makedirs(out, exist_ok=True)
        self.write_creatives(out)
        if publisher is None:
            self._write_text(imps, "jsonl", header=None)
            self._write_text(events, "csv", header=CSV_HEADER)
            self._write_avro(bids, out)
        else:
            self._publish(publisher, imps, events, bids)
        for feed in ("impressions", "clicks_conversions", "bid_requests"):
            silver = {"impressions": ["impressions"], "clicks_conversions": ["clicks", "conversions"],
                      "bid_requests": ["bid_requests"]}[feed]
            m.input_records[feed] = sum(m.silver[t] for t in silver) + m.quarantined[feed] + m.duplicates[feed]
        with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as fh:
            json.dump(m.to_json(), fh, indent=2, sort_keys=True)
        return m

    def _website(self) -> str:
        site = self.rng.choice(SITES)
        style = self.rng.random()
        if style < 0.3:
            return f"https://www.{site}/article/{self.rng.randint(1, 999)}"
        if style < 0.4:
            return f"HTTP://{site.upper()}/"
        return site

    def _event(self, kind: str, event_id: str, ts: dt.datetime, user_id: str, creative, impression_id: str = "",
               conversion_type: str = "", value: str = "") -> dict:
        """One clicks/conversions CSV line, with the fields the gold truth needs alongside."""
        stamp = _csv_time(ts) if kind == "click" else _iso(ts)
        fields = [event_id, stamp, kind, user_id, creative[1], creative[0] if kind == "click" else "", impression_id,
                  conversion_type, value, "USD" if value else ""]
        return {"type": kind, "ts": ts, "line": ",".join(fields), "id": event_id, "user": user_id,
                "campaign": creative[1], "impression_id": impression_id or None, "value": value}

    def _conversion(self, event_id: str, ts: dt.datetime, user_id: str, creative) -> dict:
        kind = self.rng.choice(CONVERSION_TYPES)
        value = f"{self.rng.uniform(1, 200):.2f}" if kind in ("purchase", "add_to_cart", "subscribe") else ""
        return self._event("conversion", event_id, ts, user_id, creative, conversion_type=kind, value=value)

    def _click_and_conversion(self, imp: dict, ts: dt.datetime, creative) -> list[dict]:
        """A click on the impression, sometimes repeated or (as fraud) stamped before it, sometimes converting."""
        rng, n = self.rng, imp["impression_id"][4:]
        click_ts = _ms(ts + dt.timedelta(seconds=min(rng.expovariate(1 / 60), 1700)))
        carries = rng.random() < 0.7
        out = [self._event("click", f"clk-{n}", click_ts, imp["user_id"], creative, imp["impression_id"] if carries else "")]
        if rng.random() < self.o.repeat_click_rate:
            again = _ms(click_ts + dt.timedelta(seconds=rng.uniform(0.5, 9.5)))
            out.append(self._event("click", f"clk-r{n}", again, imp["user_id"], creative, imp["impression_id"]))
        if rng.random() < self.o.click_before_impression_rate:
            before = _ms(ts - dt.timedelta(seconds=rng.uniform(1, 120)))
            out.append(self._event("click", f"clk-b{n}", before, imp["user_id"], creative, imp["impression_id"]))
        if rng.random() < self.o.cvr:
            conv_ts = _ms(click_ts + dt.timedelta(minutes=rng.uniform(1, 20 * 60)))
            out.append(self._conversion(f"cnv-{n}", conv_ts, imp["user_id"], creative))
        return out

    def _unclicked_conversion(self, imp: dict, ts: dt.datetime, creative) -> list[dict]:
        """View-through conversions (within the hour after an unclicked impression) and conversions
        no touch explains (another user, at a random time)."""
        rng, n = self.rng, imp["impression_id"][4:]
        if rng.random() < self.o.view_conversion_rate:
            conv_ts = _ms(ts + dt.timedelta(minutes=rng.uniform(1, 59)))
            return [self._conversion(f"cnv-v{n}", conv_ts, imp["user_id"], creative)]
        if rng.random() < self.o.untouched_conversion_rate:
            user_id = rng.choice(self.users)[0]
            return [self._conversion(f"cnv-n{n}", self._event_time(), user_id, rng.choice(self.creatives))]
        return []

    def _bid_request(self, auction_id, ts, user_id, ip, agent, creative, won: bool, bid: bool = True) -> dict:
        rng = self.rng
        floor = round(rng.uniform(0.2, 2.0), 2)
        record = {
            "auction_id": auction_id, "timestamp": _epoch_ms(ts),
            "user": {"user_id": user_id, "ip": ip, "country": None, "device_type": None, "os": None,
                     "user_agent": agent, "segments": []},
            "auction": {"auction_type": rng.choice(["FIRST_PRICE", "SECOND_PRICE"]), "floor_price": floor,
                        "currency": "USD", "tmax_ms": 120,
                        "site": {"domain": rng.choice(SITES), "page_url": None, "categories": []},
                        "placement": {"placement_id": f"pl-{rng.randint(1, 50)}", "width": creative[4], "height": creative[5]}},
            "targeting": {"campaign_ids": [creative[1]], "keywords": []},
            "bid": {"campaign_id": creative[1], "creative_id": creative[0], "bid_price": round(floor + rng.uniform(0.1, 2), 2)}
            if bid else None,
        }
        return {"ts": ts, "avro": record}

    def _lost_auctions(self, bids: list) -> None:
        """Requests that did not end in an impression: lost bids and requests not bid on."""
        rng, o = self.rng, self.o
        wins = len(bids)
        lost = int(wins / o.win_rate) - wins
        no_bid = int((wins + lost) / o.bid_rate) - (wins + lost)
        for n in range(lost + no_bid):
            user_id, ip, agent = rng.choice(self.users)
            bids.append(self._bid_request(f"auc-x{n:08d}", self._event_time(), user_id, ip, agent,
                                          rng.choice(self.creatives), won=False, bid=n < lost))

    def _duplicates(self, drops: _Drops, records: list, feed: str) -> None:
        count = int(len(records) * self.o.duplicate_rate)
        for record in self.rng.sample(records, min(count, len(records))):
            drops.add(self.rng.randrange(self.slots), record)
        self.manifest.duplicates[feed] += min(count, len(records))

    def _quarantine(self, feed: str, rules: list[str]) -> None:
        self.manifest.quarantined[feed] += 1
        self.manifest.quarantine_by_rule[feed].update(rules)

    def _invalid_impressions(self, drops: _Drops) -> None:
        rng = self.rng
        for n in range(int(self.o.impressions * self.o.invalid_rate)):
            ts = self._event_time()
            base = {"impression_id": f"imp-bad{n:07d}", "timestamp": _iso(ts), "creative_id": self.creatives[0][0],
                    "user_id": "u-bad", "website": "recipes.example.org", "cost": 0.001}
            kind = n % 6
            if kind == 0:
                line, rules = json.dumps(base)[: rng.randint(10, 40)], ["malformed_record"]
            elif kind == 1:
                base["user_id"] = ""
                line, rules = json.dumps(base), ["missing_required_field"]
            elif kind == 2:
                base["timestamp"] = rng.choice(["not-a-time", "1999-12-31T23:59:59Z", "2099-01-01T00:00:00Z"])
                line, rules = json.dumps(base), ["invalid_timestamp"]
            elif kind == 3:
                base["cost"] = -0.5
                line, rules = json.dumps(base), ["negative_amount"]
            elif kind == 4:
                base["creative_id"] = "cr-unknown"
                line, rules = json.dumps(base), ["unknown_creative"]
            else:
                base["website"] = None
                base["cost"] = -1
                line, rules = json.dumps(base), ["missing_required_field", "negative_amount"]
            drops.add(self._slot_of(ts), line)
            self._quarantine("impressions", rules)

    def _invalid_events(self, drops: _Drops) -> None:
        rng = self.rng
        clicks = max(1, int(self.o.impressions * self.o.ctr * self.o.invalid_rate * 5))
        for n in range(clicks):
            ts = self._event_time()
            c = rng.choice(self.creatives)
            fields = [f"evt-bad{n:07d}", _csv_time(ts), "click", "u-bad", c[1], c[0], "", "", "", ""]
            kind = n % 6
            rules = {0: ["malformed_record"], 1: ["missing_required_field"], 2: ["invalid_timestamp"],
                     3: ["invalid_event_type"], 4: ["invalid_conversion_type"], 5: ["negative_amount"]}[kind]
            if kind == 0:
                fields = fields[:4]
            elif kind == 1:
                fields[4] = ""
            elif kind == 2:
                fields[1] = rng.choice(["yesterday", "1999-01-01 00:00:00", "2099-05-05 10:00:00"])
            elif kind == 3:
                fields[2] = "tap"
            elif kind == 4:
                fields[2], fields[7] = "conversion", rng.choice(["", "newsletter"])
            else:
                fields[2], fields[7], fields[8] = "conversion", "purchase", "-12.50"
            drops.add(self._slot_of(ts), ",".join(fields))
            self._quarantine("clicks_conversions", rules)

    def _invalid_bids(self, drops: _Drops) -> None:
        rng = self.rng
        for n in range(int(self.o.impressions * self.o.invalid_rate)):
            user_id, ip, agent = rng.choice(self.users)
            ts = self._event_time()
            record = self._bid_request(f"auc-bad{n:07d}", ts, user_id, ip, agent, rng.choice(self.creatives), won=False)["avro"]
            kind = n % 3
            if kind == 0:
                record["user"]["user_id"], rules = "", ["missing_required_field"]
            elif kind == 1:
                record["timestamp"], rules = _epoch_ms(dt.datetime(1999, 6, 1, tzinfo=UTC)), ["invalid_timestamp"]
            else:
                record["auction"]["floor_price"], rules = -1.0, ["negative_amount"]
            drops.add(self._slot_of(ts), record)
            self._quarantine("bid_requests", rules)

    # -- writing --------------------------------------------------------------------------------
    def write_creatives(self, out: str) -> None:
        folder = os.path.join(out, "dims", "creatives")
        os.makedirs(folder, exist_ok=True)
        lines = ["creative_id,campaign_id,advertiser_id,format,width,height"]
        lines += [",".join(str(v) for v in c) for c in self.creatives]
        _write_atomic(os.path.join(folder, "creatives.csv"), ("\n".join(lines) + "\n").encode())

    def _write_text(self, drops: _Drops, ext: str, header: str | None) -> None:
        for slot, records in enumerate(drops.slots):
            if not records:
                continue
            self.rng.shuffle(records)
            body = "\n".join(([header] if header else []) + records) + "\n"
            data = body.encode("utf-8")
            name = f"part-{slot:04d}.{ext}"
            if self.o.gzip_every and slot % self.o.gzip_every == self.o.gzip_every - 1:
                data, name = gzip.compress(data, compresslevel=1), name + ".gz"
            _write_atomic(os.path.join(drops.dir, name), data)
            self.manifest.files[os.path.basename(drops.dir)] += 1

    def _write_avro(self, drops: _Drops, out: str) -> None:
        schema = fastavro.parse_schema(json.loads(bid_request_avro_schema()))
        for slot, records in enumerate(drops.slots):
            if not records:
                continue
            self.rng.shuffle(records)
            buffer = io.BytesIO()
            fastavro.writer(buffer, schema, records, codec="deflate")
            _write_atomic(os.path.join(drops.dir, f"part-{slot:04d}.avro"), buffer.getvalue())
            self.manifest.files["bid_requests"] += 1
        for n in range(self.o.corrupt_avro_files):
            # Not an Avro container at all: one undecodable record for the quarantine.
            _write_atomic(os.path.join(drops.dir, f"corrupt-{n:02d}.avro"), self.rng.randbytes(512))
            self._quarantine("bid_requests", ["malformed_record"])
            self.manifest.files["bid_requests"] += 1


    def _publish(self, publisher: KafkaPublisher, imps: _Drops, events: _Drops, bids: _Drops) -> None:
        """The same records as the file drops, as messages, slot after slot (late ones in a later slot)."""
        for n in range(self.o.corrupt_avro_files):
            # The Kafka forms of a corrupt file: a schema id nobody registered, and a cut-off body.
            record = bids.slots[0][0] if bids.slots[0] else None
            if record is not None:
                wire = publisher.wire
                body = wire.avro_body(record)
                bids.add(n % self.slots, wire.frame(body, schema_id=wire.schema_id + 1000 + n))
                bids.add(n % self.slots, wire.frame(body[: len(body) // 2]))
                self._quarantine("bid_requests", ["malformed_record"])
                self._quarantine("bid_requests", ["malformed_record"])
        slots = []
        for slot in range(self.slots):
            messages = [("impressions", line) for line in imps.slots[slot]]
            messages += [("clicks_conversions", line) for line in events.slots[slot]]
            messages += [("bid_requests", record) for record in bids.slots[slot]]
            self.rng.shuffle(messages)
            slots.append(messages)
        publisher.publish(slots)


class WireFormat:
    """Bid requests as Kafka messages in the Confluent wire format of SPEC §1.3."""

    def __init__(self, schema_id: int):
        self.schema_id = schema_id
        self.schema = fastavro.parse_schema(json.loads(bid_request_avro_schema()))

    def avro_body(self, record: dict) -> bytes:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, self.schema, record)
        return buffer.getvalue()

    def frame(self, body: bytes, schema_id: int | None = None) -> bytes:
        """Magic byte 0, the schema id as 4 big-endian bytes, then the Avro body."""
        return b"\x00" + struct.pack(">I", self.schema_id if schema_id is None else schema_id) + body


class KafkaPublisher:
    """Sends generated records to the feed topics, keyed by user id so one user's events stay in
    order in one partition, at a fixed rate or as fast as the broker takes them."""

    def __init__(self, producer_config: dict, topics: dict[str, str], schema_id: int,
                 rate: float | None = None, progress: bool = True):
        from confluent_kafka import Producer

        self.producer = Producer({"enable.idempotence": True, "linger.ms": 20, "compression.type": "lz4",
                                  **producer_config})
        self.topics, self.rate, self.progress = topics, rate, progress
        self.wire = WireFormat(schema_id)
        self.failed: list[str] = []
        self.sent = 0

    def _message(self, feed: str, record) -> tuple[bytes | None, bytes]:
        if feed == "bid_requests":
            if isinstance(record, bytes):  # already in the wire format (a broken message on purpose)
                return None, record
            return record["user"]["user_id"].encode(), self.wire.frame(self.wire.avro_body(record))
        if feed == "impressions":
            try:
                user = json.loads(record).get("user_id")
            except ValueError:
                user = None
        else:
            fields = record.split(",")
            user = fields[3] if len(fields) > 3 else None
        return (user.encode() if isinstance(user, str) and user else None), record.encode("utf-8")

    def _on_delivery(self, err, _msg) -> None:
        if err is not None:
            self.failed.append(str(err))

    def encode(self, slots: list[list[tuple[str, object]]]) -> list[list[tuple[str, bytes | None, bytes]]]:
        """(topic, key, value) of every message, slot by slot."""
        total = sum(len(messages) for messages in slots)
        with tqdm(total=total, desc="encoding messages", unit="msg", disable=not self.progress) as bar:
            encoded = []
            for messages in slots:
                encoded.append([(self.topics[feed], *self._message(feed, record)) for feed, record in messages])
                bar.update(len(messages))
        return encoded

    def publish(self, slots: list[list[tuple[str, object]]]) -> None:
        """Send the slots' records in order. Every message is encoded before the first is sent, so
        that at a fixed rate the send loop only hands bytes to the client: on a machine shared with
        the pipeline, the producer's CPU is then the client's, not the encoders' (JSON keys, Avro)."""
        encoded = self.encode(slots)
        total = sum(len(messages) for messages in encoded)
        bar = tqdm(total=total, desc="publishing to Kafka", unit="msg", disable=not self.progress)
        started = time.monotonic()
        for messages in encoded:
            for topic, key, value in messages:
                while True:
                    try:
                        self.producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
                        break
                    except BufferError:  # the local queue is full: let the broker catch up
                        self.producer.poll(0.1)
                self.sent += 1
                if self.sent % 1000 == 0:
                    self.producer.poll(0)
                    bar.update(1000)
                    if self.rate:
                        ahead = self.sent / self.rate - (time.monotonic() - started)
                        if ahead > 0:
                            time.sleep(ahead)
        remaining = self.producer.flush(120)
        bar.update(self.sent - bar.n)
        bar.close()
        if remaining or self.failed:
            raise RuntimeError(f"Kafka did not take {remaining + len(self.failed)} of {total} messages: "
                               f"{self.failed[0] if self.failed else 'flush timed out'}")


def generate(out: str, options: GeneratorOptions, progress: bool = True,
             publisher: KafkaPublisher | None = None) -> Manifest:
    return Generator(options).generate(out, progress=progress, publisher=publisher)


# -- ground truth for gold ----------------------------------------------------------------------
# SPEC §3 and §4 with the default windows, written out in plain Python over the generated events
# (never through Spark), so the gold tests check the pipeline against an independent reading.
CLICK_WINDOW = dt.timedelta(minutes=30)
CONVERSION_CLICK_WINDOW = dt.timedelta(hours=24)
CONVERSION_VIEW_WINDOW = dt.timedelta(hours=1)
BID_WINDOW = dt.timedelta(minutes=5)
REPEAT_WINDOW = dt.timedelta(seconds=10)


def _latest(items: list[dict]) -> dict | None:
    return max(items, key=lambda e: (e["ts"], e["id"])) if items else None


def _resolve_clicks(clicks: list[dict], impressions: list[dict]) -> list[dict]:
    by_id = {i["id"]: i for i in impressions}
    by_user_campaign: dict[tuple, list[dict]] = {}
    for i in impressions:
        by_user_campaign.setdefault((i["user"], i["campaign"]), []).append(i)
    for c in clicks:
        named = by_id.get(c["impression_id"]) if c["impression_id"] else None
        c["ivt"], c["match"], c["impression"] = False, "none", None
        if named is not None and named["ts"] > c["ts"]:
            c["ivt"] = True  # click_before_impression
        elif named is not None:
            c["match"], c["impression"] = "impression_id", named["id"]
        else:
            window = [i for i in by_user_campaign.get((c["user"], c["campaign"]), [])
                      if i["ts"] <= c["ts"] <= i["ts"] + CLICK_WINDOW]
            latest = _latest(window)
            if latest is not None:
                c["match"], c["impression"] = "window", latest["id"]
    previous: dict[tuple, dict] = {}
    for c in sorted((c for c in clicks if not c["ivt"]), key=lambda e: (e["ts"], e["id"])):
        clicked = c["impression"] or c["impression_id"]
        if clicked is None:
            continue
        before = previous.get((c["user"], clicked))
        previous[(c["user"], clicked)] = c
        if before is not None and c["ts"] <= before["ts"] + REPEAT_WINDOW:
            c["ivt"], c["match"], c["impression"] = True, "none", None  # repeat_click
    return clicks


def expected_gold(impressions: list[dict], events: list[dict], bid_requests: list[dict]) -> tuple[dict, dict]:
    """(gold per "date|campaign", bid funnel per date) as SPEC defines them."""
    counted_imps = [i for i in impressions if not i["ivt"]]
    clicks = _resolve_clicks([dict(e) for e in events if e["type"] == "click"], counted_imps)
    conversions = [e for e in events if e["type"] == "conversion"]
    # A conversion's touches are its user's in its campaign: indexed once, not searched per conversion
    # (a scan of every click and impression per conversion took over ten minutes at 1M impressions).
    clicks_of: dict[tuple, list[dict]] = {}
    for c in clicks:
        if not c["ivt"]:
            clicks_of.setdefault((c["user"], c["campaign"]), []).append(c)
    impressions_of: dict[tuple, list[dict]] = {}
    for i in counted_imps:
        impressions_of.setdefault((i["user"], i["campaign"]), []).append(i)
    daily: dict[str, Counter] = {}

    def row(ts: dt.datetime, campaign: str) -> Counter:
        return daily.setdefault(f"{ts.date().isoformat()}|{campaign}", Counter())

    for i in impressions:
        r = row(i["ts"], i["campaign"])
        if i["ivt"]:
            r["ivt_impressions"] += 1
        else:
            r["impressions"] += 1
            r["spend"] += i["cost"]
    for c in clicks:
        r = row(c["ts"], c["campaign"])
        if c["ivt"]:
            r["ivt_clicks"] += 1
        else:
            r["clicks"] += 1
            r["attributed_clicks"] += c["match"] != "none"
    for v in conversions:
        r = row(v["ts"], v["campaign"])
        r["conversions"] += 1
        r["conversion_value"] += Decimal(v["value"] or "0")
        same = (v["user"], v["campaign"])
        by_click = any(c["ts"] <= v["ts"] <= c["ts"] + CONVERSION_CLICK_WINDOW for c in clicks_of.get(same, ()))
        by_view = any(i["ts"] <= v["ts"] <= i["ts"] + CONVERSION_VIEW_WINDOW for i in impressions_of.get(same, ()))
        r["attributed_conversions"] += by_click or by_view

    impression_of_auction = {i["auction_id"]: i for i in counted_imps if i["auction_id"]}
    funnel: dict[str, Counter] = {}
    for b in bid_requests:
        record = b["avro"]
        if record["user"]["user_agent"] in BOT_AGENTS:
            continue
        f = funnel.setdefault(b["ts"].date().isoformat(), Counter())
        f["bid_requests"] += 1
        if record["bid"] is None:
            continue
        f["bids"] += 1
        won = impression_of_auction.get(record["auction_id"])
        is_win = won is not None and b["ts"] <= won["ts"] <= b["ts"] + BID_WINDOW
        f["wins"] += is_win
        r = row(b["ts"], record["bid"]["campaign_id"])
        r["bids"] += 1
        r["wins"] += is_win

    metrics = ["impressions", "clicks", "attributed_clicks", "conversions", "attributed_conversions",
               "ivt_impressions", "ivt_clicks", "bids", "wins"]
    gold = {key: {**{m: int(r[m]) for m in metrics},
                  "spend": str(Decimal(r["spend"]).quantize(Decimal("0.000001"))),
                  "conversion_value": str(Decimal(r["conversion_value"]).quantize(Decimal("0.000001")))}
            for key, r in sorted(daily.items())}
    bids = {date: {m: int(f[m]) for m in ("bid_requests", "bids", "wins")} for date, f in sorted(funnel.items())}
    return gold, bids

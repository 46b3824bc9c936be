"""Seeded sample-data generator: file drops in the SPEC formats plus a ground-truth manifest.

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
from collections import Counter
from dataclasses import asdict, dataclass, field

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
    gzip_every: int = 3
    corrupt_avro_files: int = 1


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

    def to_json(self) -> dict:
        # dataclasses.asdict would rebuild each Counter from (key, value) pairs, counting the pairs.
        def plain(value):
            return {k: plain(v) for k, v in value.items()} if isinstance(value, dict) else value
        return {name: plain(getattr(self, name)) for name in self.__dataclass_fields__}


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
        self.slots[min(slot, len(self.slots) - 1)].append(record)


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
        self.slot_span = dt.timedelta(days=options.days) / self.slots
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
        return self.start + dt.timedelta(seconds=self.rng.uniform(0, self.o.days * 86400 - 7200))

    def _arrival_slot(self, ts: dt.datetime, feed: str) -> int:
        slot = self._slot_of(ts)
        if self.rng.random() < self.o.late_rate:
            self.manifest.late[feed] += 1
            return slot + self.rng.randint(2, 4)
        return slot

    # -- generation -----------------------------------------------------------------------------
    def generate(self, out: str, progress: bool = True) -> Manifest:
        o, rng, m = self.o, self.rng, self.manifest
        imps = _Drops(out, "impressions", self.slots)
        events = _Drops(out, "clicks_conversions", self.slots)
        bids = _Drops(out, "bid_requests", self.slots)
        valid_imps, valid_events, valid_bids = [], [], []

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
                imp["timestamp"] = int(ts.timestamp() * 1000)
            if rng.random() < o.rtb_share:
                imp["auction_id"] = f"auc-{n:08d}"
                valid_bids.append(self._bid_request(imp["auction_id"], ts - dt.timedelta(milliseconds=rng.randint(50, 3000)),
                                                    user_id, ip, agent, creative, won=True))
                m.ivt["bid_requests"] += is_bot
            imps.add(self._arrival_slot(ts, "impressions"), json.dumps(imp))
            valid_imps.append(imp)
            m.ivt["impressions"] += is_bot
            if not is_bot and rng.random() < o.ctr:
                valid_events.extend(self._click_and_conversion(imp, ts, creative))
        bar.close()
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

        self._write_creatives(out)
        self._write_text(imps, "jsonl", header=None)
        self._write_text(events, "csv", header=CSV_HEADER)
        self._write_avro(bids, out)
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

    def _click_and_conversion(self, imp: dict, ts: dt.datetime, creative) -> list[dict]:
        rng = self.rng
        click_ts = ts + dt.timedelta(seconds=min(rng.expovariate(1 / 60), 1700))
        click_id = f"clk-{imp['impression_id'][4:]}"
        carries = rng.random() < 0.7
        fields = [click_id, _csv_time(click_ts), "click", imp["user_id"], creative[1], creative[0],
                  imp["impression_id"] if carries else "", "", "", ""]
        out = [{"type": "click", "ts": click_ts, "line": ",".join(fields)}]
        if rng.random() < self.o.cvr:
            conv_ts = click_ts + dt.timedelta(minutes=rng.uniform(1, 20 * 60))
            kind = rng.choice(CONVERSION_TYPES)
            value = f"{rng.uniform(1, 200):.2f}" if kind in ("purchase", "add_to_cart", "subscribe") else ""
            conv = [f"cnv-{imp['impression_id'][4:]}", conv_ts.isoformat().replace("+00:00", "Z"), "conversion",
                    imp["user_id"], creative[1], "", "", kind, value, "USD" if value else ""]
            out.append({"type": "conversion", "ts": conv_ts, "line": ",".join(conv)})
        return out

    def _bid_request(self, auction_id, ts, user_id, ip, agent, creative, won: bool, bid: bool = True) -> dict:
        rng = self.rng
        floor = round(rng.uniform(0.2, 2.0), 2)
        record = {
            "auction_id": auction_id, "timestamp": int(ts.timestamp() * 1000),
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
                record["timestamp"], rules = int(dt.datetime(1999, 6, 1, tzinfo=UTC).timestamp() * 1000), ["invalid_timestamp"]
            else:
                record["auction"]["floor_price"], rules = -1.0, ["negative_amount"]
            drops.add(self._slot_of(ts), record)
            self._quarantine("bid_requests", rules)

    # -- writing --------------------------------------------------------------------------------
    def _write_creatives(self, out: str) -> None:
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


def generate(out: str, options: GeneratorOptions, progress: bool = True) -> Manifest:
    return Generator(options).generate(out, progress=progress)

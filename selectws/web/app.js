// The article's browser chat, for selectws's `chat` plugin on /chat.
//
// Protocol (JSON text messages): we send {"type":"login","name","room"} once the socket is open and
// {"type":"say","text"}; the server answers "welcome" (with the room's members, us included), and tells the
// room "joined", "said" and "left"; a refused message comes back as {"type":"error","reason"}.
//
// When the connection drops we reconnect with exponential backoff and jitter, and log in again to the same
// room under the same name. No framework, no build step: this file is served as is.
//
// On a route with history_size (docs/history.md) room messages carry "offset", and welcome the room's "epoch" and
// latest "offset". We keep that position, and the log, in sessionStorage (per tab, per room: it survives a
// reload), and log back in with "since": the server first replays what we missed, then says "recovered". Each
// room message is shown once, whatever arrives twice (see isDuplicate).
"use strict";

(() => {
  const BACKOFF_BASE_MS = 1000; // first retry after 0.5-1 s, then 1-2 s, 2-4 s, ...
  const BACKOFF_MAX_MS = 30000; // ... never more than 30 s apart
  const CHAT_PATH = "/chat";
  // On a route with auth = "jwt" (docs/auth.md): open this page as /?token=<jwt>; the token goes on the WebSocket
  // URL, and the server takes our name from it (login then sends only the room).
  const TOKEN = new URLSearchParams(window.location.search).get("token");
  // sessionStorage key of a room: {name, epoch, offset, log}; log holds the last LOG_KEEP lines of the page.
  const STORE_PREFIX = "selectws.chat.room:";
  const LOG_KEEP = 200;

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"),
    roomTitle: $("room-title"),
    loginView: $("login-view"),
    loginForm: $("login-form"),
    loginError: $("login-error"),
    name: $("name"),
    room: $("room"),
    chatView: $("chat-view"),
    members: $("members"),
    memberCount: $("member-count"),
    leave: $("leave"),
    log: $("log"),
    sayForm: $("say-form"),
    text: $("text"),
    send: $("send"),
    endpoint: $("endpoint"),
  };

  let ws = null; // the current WebSocket, or null
  let wanted = null; // {name, room} we want to be logged in as; null once the user left
  let me = null; // the name the server welcomed us as, while logged in
  let relogin = false; // the login in flight is an automatic one after a reconnect
  let attempt = 0; // failed connections since the last welcome
  let retryTimer = null;
  let countdownTimer = null;
  let retryAt = 0;
  let members = [];
  let myName = null; // the name we were last welcomed as (our own joined/left in a replay are not shown)
  // Where we are in the room's history, on a route with history: {epoch, offset} (offset: the highest offset
  // received), or null. seen maps the offsets received in this epoch (the last LOG_KEEP) to their message.
  let position = null;
  let seen = new Map();
  let replay = null; // {shown: N} while a login with "since" waits for welcome: what arrives meanwhile is missed
  let entries = []; // the log's lines as data, for sessionStorage

  // ws: next to http:, wss: next to https:, on the host and port that served this page.
  function chatUrl() {
    const url = new URL(CHAT_PATH, window.location.href);
    url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
    url.search = TOKEN ? `?token=${encodeURIComponent(TOKEN)}` : "";
    url.hash = "";
    return url.href;
  }

  // ---------------------------------------------------------------- connection state
  function setStatus(state, text) {
    ui.status.dataset.state = state;
    ui.status.textContent = text;
  }

  function setInputEnabled(on) {
    ui.text.disabled = !on;
    ui.send.disabled = !on;
    ui.text.placeholder = on ? "Say something…" : "Waiting for the connection…";
  }

  function clearRetry() {
    if (retryTimer !== null) clearTimeout(retryTimer);
    if (countdownTimer !== null) clearInterval(countdownTimer);
    retryTimer = countdownTimer = null;
  }

  function connect() {
    clearRetry();
    if (!wanted) return;
    const sock = new WebSocket(chatUrl());
    ws = sock;
    setStatus("connecting", attempt ? `connecting (attempt ${attempt + 1})…` : "connecting…");
    sock.onopen = () => {
      if (ws !== sock) return;
      setStatus("connecting", "logging in…");
      const login = TOKEN ? { type: "login", room: wanted.room } : { type: "login", name: wanted.name, room: wanted.room };
      if (position && position.epoch) {
        login.since = { epoch: position.epoch, offset: position.offset };
        replay = { shown: 0 };
      } else {
        replay = null;
      }
      sock.send(JSON.stringify(login));
    };
    sock.onmessage = (event) => {
      if (ws !== sock) return;
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch {
        addLine("error", "the server sent something that is not JSON");
        return;
      }
      handle(sock, msg);
    };
    sock.onclose = (event) => {
      if (ws !== sock) return; // a socket we already gave up on
      ws = null;
      const wasOnline = me !== null;
      me = null;
      setInputEnabled(false);
      if (!wanted) {
        setStatus("offline", "offline");
        return;
      }
      if (wasOnline) {
        const why = event.reason ? `${event.code} ${event.reason}` : `${event.code}`;
        addLine("system", `connection lost (${why}); reconnecting`);
      }
      relogin = true;
      scheduleReconnect();
    };
    // An error is always followed by close, which does the work.
    sock.onerror = () => {};
  }

  function scheduleReconnect() {
    clearRetry();
    // Exponential backoff with "equal jitter": half the step fixed, half random, so a server restart does not
    // bring every browser back in the same millisecond, and no retry comes sooner than half its step.
    const step = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** attempt);
    const delay = step / 2 + Math.random() * (step / 2);
    attempt += 1;
    retryAt = Date.now() + delay;
    retryTimer = setTimeout(connect, delay);
    countdown();
    countdownTimer = setInterval(countdown, 250);
  }

  function countdown() {
    const seconds = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
    setStatus("reconnecting", `reconnecting in ${seconds} s`);
  }

  // ---------------------------------------------------------------- protocol
  function handle(sock, msg) {
    if (msg.type === "said" || msg.type === "joined" || msg.type === "left") {
      if (isDuplicate(msg)) return;
      // Our own joined and left are not news to us: the room's record of our earlier visits, in a replay (we were
      // not sent them live), or a "left" for our old connection racing our return. Kept in the position only.
      if (msg.type !== "said" && msg.name === (me !== null ? me : myName)) return;
      // Before welcome, after a login with "since": a message we missed, replayed by the server.
      const missed = replay !== null && me === null;
      if (missed) replay.shown += 1;
      roomMessage(msg, missed);
      return;
    }
    switch (msg.type) {
      case "welcome": {
        me = msg.name;
        myName = msg.name;
        attempt = 0;
        members = Array.isArray(msg.members) ? msg.members.slice() : [msg.name];
        renderMembers();
        showChat(msg.name, msg.room);
        setStatus("online", "online");
        setInputEnabled(true);
        addLine("system", relogin ? `back in ${msg.room} as ${msg.name}` : `you joined ${msg.room} as ${msg.name}`);
        if (msg.recovered === true && replay !== null && replay.shown > 0) {
          const n = replay.shown;
          addLine("system recovery", `caught up on ${n} missed message${n === 1 ? "" : "s"}`);
        } else if (msg.recovered === false) {
          addLine("system recovery", "history lost; showing new messages");
        }
        replay = null;
        relogin = false;
        welcomePosition(msg);
        remember(msg.name, msg.room);
        ui.text.focus();
        break;
      }
      case "error":
        if (me === null) loginRefused(sock, String(msg.reason));
        else addLine("error", `error: ${msg.reason}`);
        break;
      default:
        addLine("error", `unknown message type ${JSON.stringify(msg.type)}`);
    }
  }

  // A room message, live or replayed (missed = true: marked as such).
  function roomMessage(msg, missed) {
    switch (msg.type) {
      case "joined":
        if (!members.includes(msg.name)) members.push(msg.name);
        renderMembers();
        addEntry({ kind: "joined", time: timeNow(), from: msg.name, text: `${msg.name} joined`, offset: msg.offset, missed });
        break;
      case "left":
        members = members.filter((n) => n !== msg.name);
        renderMembers();
        addEntry({ kind: "left", time: timeNow(), from: msg.name, text: `${msg.name} left`, offset: msg.offset, missed });
        break;
      default: {
        const mine = msg.from === (me !== null ? me : myName);
        addEntry({ kind: "msg", time: timeNow(), from: msg.from, text: msg.text, mine, offset: msg.offset, missed });
      }
    }
  }

  // ---------------------------------------------------------------- history position
  function messageKey(msg) {
    return JSON.stringify([msg.type, msg.type === "said" ? msg.from : msg.name, msg.type === "said" ? msg.text : ""]);
  }

  // The same key, from a line of the log restored after a reload.
  function entryKey(entry) {
    const type = entry.kind === "msg" ? "said" : entry.kind;
    return messageKey({ type, from: entry.from, name: entry.from, text: entry.text });
  }

  // The dedupe rule. A room message without an offset (a route without history) is always new. One with an
  // offset above the highest we received is new. One at or below it is a duplicate when it is the message we
  // received at that offset; a different message there means the room's history started again (a new epoch: the
  // room was quiet for longer than history_ttl while we stayed connected) and it is new. Records what it accepts.
  function isDuplicate(msg) {
    const offset = msg.offset;
    if (!Number.isInteger(offset) || offset < 1) return false;
    const key = messageKey(msg);
    if (position !== null && offset <= position.offset) {
      if (seen.get(offset) === key) return true;
      // History started again. The epoch we keep is now stale: logging back in with it gets "recovered": false,
      // which is the truth (we cannot ask for what we missed in an epoch we were never told).
      seen = new Map();
    }
    if (position === null) position = { epoch: null, offset };
    position.offset = offset;
    seen.set(offset, key);
    if (seen.size > LOG_KEEP) seen.delete(seen.keys().next().value);
    return false;
  }

  // welcome: the room's epoch and latest offset (on a route with history). A new epoch (or none) starts afresh.
  function welcomePosition(msg) {
    if (typeof msg.epoch !== "string" || msg.epoch === "" || !Number.isInteger(msg.offset)) {
      // No history on this route, or the server could not read it just now: nothing to remember.
      position = null;
      seen = new Map();
      forget(wanted ? wanted.room : msg.room);
      return;
    }
    if (position === null || position.epoch !== msg.epoch || msg.recovered !== true) {
      if (position === null || position.epoch !== msg.epoch) seen = new Map();
      position = { epoch: msg.epoch, offset: msg.offset };
    } else {
      position.offset = Math.max(position.offset, msg.offset);
    }
    save();
  }

  function storeKey(room) {
    return STORE_PREFIX + room;
  }

  function save() {
    if (!wanted || position === null || !position.epoch) return;
    entries = entries.slice(-LOG_KEEP);
    const record = { name: myName, epoch: position.epoch, offset: position.offset, log: entries };
    try {
      window.sessionStorage.setItem(storeKey(wanted.room), JSON.stringify(record));
    } catch {
      // Storage full or disabled: recovery after a reconnect still works, only a reload starts afresh.
    }
  }

  function load(room) {
    try {
      const record = JSON.parse(window.sessionStorage.getItem(storeKey(room)) || "null");
      if (record && typeof record.epoch === "string" && record.epoch && Number.isInteger(record.offset)
          && record.offset >= 0 && Array.isArray(record.log)) return record;
    } catch {
      // Unreadable: start afresh.
    }
    return null;
  }

  function forget(room) {
    try {
      window.sessionStorage.removeItem(storeKey(room));
    } catch {
      // Nothing to forget.
    }
  }

  function loginRefused(sock, reason) {
    if (relogin) {
      // Logging back in after a reconnect: the server may not have noticed our old connection is gone yet
      // ("name is already taken"). Try again later; the close handler schedules it.
      addLine("error", `error: ${reason}`);
      sock.close(1000, "retrying login");
      return;
    }
    wanted = null;
    ws = null;
    sock.close(1000, "login refused");
    setStatus("offline", "offline");
    showLogin(reason);
  }

  function send(obj) {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify(obj));
      return true;
    }
    return false;
  }

  // ---------------------------------------------------------------- views
  function showChat(name, room) {
    ui.loginView.hidden = true;
    ui.chatView.hidden = false;
    ui.roomTitle.hidden = false;
    ui.roomTitle.textContent = `#${room} · ${name}`;
  }

  function showLogin(error) {
    ui.chatView.hidden = true;
    ui.loginView.hidden = false;
    ui.roomTitle.hidden = true;
    ui.loginError.hidden = !error;
    ui.loginError.textContent = error ? `Could not join: ${error}` : "";
    ui.name.focus();
  }

  function renderMembers() {
    ui.members.replaceChildren(
      ...members.map((name) => {
        const li = document.createElement("li");
        li.textContent = name;
        if (name === me) {
          li.classList.add("me");
          const you = document.createElement("span");
          you.className = "you";
          you.textContent = " (you)";
          li.append(you);
        }
        return li;
      }),
    );
    ui.memberCount.textContent = String(members.length);
  }

  function timeNow() {
    return new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function appendToLog(li) {
    const atBottom = ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 40;
    ui.log.append(li);
    if (atBottom) ui.log.scrollTop = ui.log.scrollHeight;
  }

  // A line of the log from its data: {kind, time, text, from?, mine?, offset?, missed?}. Everything from the
  // network goes in as textContent, never as HTML.
  function renderEntry(entry) {
    const li = document.createElement("li");
    li.className = `line ${entry.kind}${entry.mine ? " mine" : ""}${entry.missed ? " missed" : ""}`;
    if (Number.isInteger(entry.offset)) li.dataset.offset = String(entry.offset);
    if (entry.missed) li.title = "missed while you were away";
    const time = document.createElement("time");
    time.textContent = entry.time;
    li.append(time);
    if (entry.kind === "msg") {
      const who = document.createElement("span");
      who.className = "from";
      who.textContent = entry.from;
      li.append(who);
    }
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = entry.text;
    li.append(body);
    return li;
  }

  function addEntry(entry) {
    appendToLog(renderEntry(entry));
    entries.push(entry);
    if (entries.length > 2 * LOG_KEEP) entries = entries.slice(-LOG_KEEP);
    save();
  }

  function addLine(kind, text) {
    addEntry({ kind, time: timeNow(), text });
  }

  // The address bar says who we are, so a reload joins the same room again.
  function remember(name, room) {
    const params = new URLSearchParams(TOKEN ? { room, token: TOKEN } : { name, room });
    window.history.replaceState(null, "", `${window.location.pathname}?${params}`);
  }

  // ---------------------------------------------------------------- user actions
  // Join a room. When this tab was in it before (a reload), its log comes back from sessionStorage and the login
  // asks for what was said meanwhile.
  function join(name, room) {
    wanted = { name, room };
    attempt = 0;
    ui.loginError.hidden = true;
    ui.log.replaceChildren();
    members = [];
    renderMembers();
    const record = load(room);
    position = null;
    seen = new Map();
    entries = [];
    myName = TOKEN ? null : name;
    relogin = false;
    if (record) {
      position = { epoch: record.epoch, offset: record.offset };
      for (const entry of record.log) {
        if (!entry || typeof entry !== "object" || typeof entry.kind !== "string") continue;
        const clean = {
          kind: entry.kind, time: String(entry.time || ""), text: String(entry.text || ""),
          from: String(entry.from || ""), mine: Boolean(entry.mine), missed: Boolean(entry.missed),
          offset: Number.isInteger(entry.offset) ? entry.offset : undefined,
        };
        entries.push(clean);
        ui.log.append(renderEntry(clean));
        if (clean.offset !== undefined && clean.offset <= record.offset) seen.set(clean.offset, entryKey(clean));
      }
      ui.log.scrollTop = ui.log.scrollHeight;
      // Our own previous visit, under the same name: logging back in, as after a reconnect (a "name is already
      // taken" meanwhile means the server has not yet seen our old connection go; it is retried).
      if (typeof record.name === "string" && (TOKEN || record.name === name)) {
        relogin = true;
        myName = record.name;
      }
    }
    connect();
  }

  ui.loginForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = ui.name.value.trim();
    const room = ui.room.value.trim() || "lobby";
    if (!name && !TOKEN) {
      showLogin("pick a name");
      return;
    }
    join(name, room);
  });

  ui.sayForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.text.value;
    if (!text.trim()) return;
    if (send({ type: "say", text })) ui.text.value = "";
  });

  ui.leave.addEventListener("click", () => {
    if (wanted) forget(wanted.room); // left for good: coming back is a new visit
    position = null;
    seen = new Map();
    replay = null;
    wanted = null;
    me = null;
    clearRetry();
    const sock = ws;
    ws = null;
    if (sock) sock.close(1000, "left");
    setInputEnabled(false);
    setStatus("offline", "offline");
    window.history.replaceState(null, "", TOKEN ? `${window.location.pathname}?token=${encodeURIComponent(TOKEN)}`
      : window.location.pathname);
    showLogin(null);
  });

  // Back on the network: no point waiting out the backoff.
  window.addEventListener("online", () => {
    if (wanted && retryTimer !== null) connect();
  });

  // ---------------------------------------------------------------- start
  ui.endpoint.textContent = chatUrl();
  setInputEnabled(false);
  const params = new URLSearchParams(window.location.search);
  const name = (params.get("name") || "").trim();
  const room = (params.get("room") || "").trim();
  if (room) ui.room.value = room;
  if (TOKEN) {
    ui.name.required = false;
    ui.name.disabled = true;
    ui.name.placeholder = "from your token";
  }
  if (TOKEN && room) {
    join("", room);
  } else if (name) {
    ui.name.value = name;
    join(name, room || "lobby");
  } else {
    showLogin(null);
  }
})();

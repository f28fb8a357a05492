// The article's browser chat, for selectws's `chat` plugin on /chat.
//
// Protocol (JSON text messages): we send {"type":"login","name","room"} once the socket is open and
// {"type":"say","text"}; the server answers "welcome" (with the room's members, us included), and tells the
// room "joined", "said" and "left"; a refused message comes back as {"type":"error","reason"}.
//
// When the connection drops we reconnect with exponential backoff and jitter, and log in again to the same
// room under the same name. No framework, no build step: this file is served as is.
"use strict";

(() => {
  const BACKOFF_BASE_MS = 1000; // first retry after 0.5-1 s, then 1-2 s, 2-4 s, ...
  const BACKOFF_MAX_MS = 30000; // ... never more than 30 s apart
  const CHAT_PATH = "/chat";
  // On a route with auth = "jwt" (docs/auth.md): open this page as /?token=<jwt>; the token goes on the WebSocket
  // URL, and the server takes our name from it (login then sends only the room).
  const TOKEN = new URLSearchParams(window.location.search).get("token");

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
    switch (msg.type) {
      case "welcome":
        me = msg.name;
        attempt = 0;
        members = Array.isArray(msg.members) ? msg.members.slice() : [msg.name];
        renderMembers();
        showChat(msg.name, msg.room);
        setStatus("online", "online");
        setInputEnabled(true);
        addLine("system", relogin ? `back in ${msg.room} as ${msg.name}` : `you joined ${msg.room} as ${msg.name}`);
        relogin = false;
        remember(msg.name, msg.room);
        ui.text.focus();
        break;
      case "joined":
        if (!members.includes(msg.name)) members.push(msg.name);
        renderMembers();
        addLine("joined", `${msg.name} joined`);
        break;
      case "left":
        members = members.filter((n) => n !== msg.name);
        renderMembers();
        addLine("left", `${msg.name} left`);
        break;
      case "said":
        addMessage(msg.from, msg.text);
        break;
      case "error":
        if (me === null) loginRefused(sock, String(msg.reason));
        else addLine("error", `error: ${msg.reason}`);
        break;
      default:
        addLine("error", `unknown message type ${JSON.stringify(msg.type)}`);
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

  // Everything from the network goes in as textContent, never as HTML.
  function addLine(kind, text) {
    const li = document.createElement("li");
    li.className = `line ${kind}`;
    const time = document.createElement("time");
    time.textContent = timeNow();
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    li.append(time, body);
    appendToLog(li);
  }

  function addMessage(from, text) {
    const li = document.createElement("li");
    li.className = from === me ? "line msg mine" : "line msg";
    const time = document.createElement("time");
    time.textContent = timeNow();
    const who = document.createElement("span");
    who.className = "from";
    who.textContent = from;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    li.append(time, who, body);
    appendToLog(li);
  }

  // The address bar says who we are, so a reload joins the same room again.
  function remember(name, room) {
    const params = new URLSearchParams(TOKEN ? { room, token: TOKEN } : { name, room });
    window.history.replaceState(null, "", `${window.location.pathname}?${params}`);
  }

  // ---------------------------------------------------------------- user actions
  function join(name, room) {
    wanted = { name, room };
    relogin = false;
    attempt = 0;
    ui.loginError.hidden = true;
    ui.log.replaceChildren();
    members = [];
    renderMembers();
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

// The chat client from "A quick chat WebSockets/AMQP client", without
// jQuery. A line is only shown when the server sends it back: what you
// type goes to the broker, and the broker sends it to every page, yours too.
//
// It speaks wsamqp.v1: the room is in the address (#room-name), the page
// joins with the room's last lines (history), keeps the offset of the last
// line it has, and when the connection comes back it asks for what it
// missed (since): nothing is lost to a Wi-Fi drop or a server restart.
"use strict";

const log = document.getElementById("log");
const status = document.getElementById("status");
const form = document.getElementById("chat");
const nameInput = document.getElementById("name");
const textInput = document.getElementById("text");
const sendButton = document.getElementById("send");
const roomForm = document.getElementById("rooms");
const roomInput = document.getElementById("room");

const maxLines = 1000;      // lines kept in the page; the oldest go first
const historyLines = 50;    // lines of the room shown on joining
const roomPattern = /^[a-z0-9][a-z0-9_-]{0,63}$/;

nameInput.value = localStorage.getItem("wsamqp.name") || "";
nameInput.addEventListener("input", () => localStorage.setItem("wsamqp.name", nameInput.value.trim()));

let socket = null;
let room = roomFromAddress();
const lastOffset = new Map(); // room -> offset of the last line shown
let retryDelay = 500;         // grows to maxRetryDelay while the server is away
const maxRetryDelay = 10000;
let retryTimer = null;

function roomFromAddress() {
  const name = decodeURIComponent(location.hash.slice(1)).toLowerCase();
  return roomPattern.test(name) ? name : "lobby";
}

function setStatus(state, text) {
  status.dataset.state = state;
  status.textContent = text;
  const connected = state === "connected";
  textInput.disabled = !connected;
  sendButton.disabled = !connected;
  if (connected) textInput.focus();
}

// append adds an element to the log, keeping the reader's place when
// scrolled back, and at most maxLines lines.
function append(li) {
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(li);
  while (log.children.length > maxLines) log.firstElementChild.remove();
  if (atBottom) li.scrollIntoView({ block: "end" });
}

// note shows a line from the page itself: quiet, or a warning.
function note(text, kind) {
  const li = document.createElement("li");
  li.className = `note ${kind || ""}`;
  li.textContent = text;
  append(li);
}

// journey says how long a live line took, hop by hop, from the times the
// bridges put on it (t: in, out, back) and what this page measured: when
// it was sent (the payload's "at", if a page like this one sent it) and
// when it arrived. The hops across two clocks are as good as the clocks.
function journey(payload, t, arrived) {
  const ms = (x) => `${x.toFixed(1)} ms`;
  const hops = [];
  if (payload && typeof payload.at === "number") hops.push(`browser → bridge ${ms(t.in - payload.at)}`);
  hops.push(`in the bridge ${ms(t.out - t.in)}`, `bridge → broker → bridge ${ms(t.back - t.out)}`, `bridge → browser ${ms(arrived - t.back)}`);
  if (payload && typeof payload.at === "number") hops.push(`total ${ms(arrived - payload.at)}`);
  return hops.join(" · ");
}

// show appends one message, as text, never as HTML. Chat lines show their
// name; anything else (another AMQP producer) is shown as it came. A live
// line shows its journey on hover, or on a tap.
function show(payload, timing) {
  const li = document.createElement("li");
  if (timing) {
    li.title = timing;
    li.addEventListener("click", () => {
      const shown = li.querySelector(".journey");
      if (shown) { shown.remove(); return; }
      const span = document.createElement("span");
      span.className = "journey";
      span.textContent = timing;
      li.append(span);
    });
  }
  if (payload && typeof payload === "object" && typeof payload.text === "string") {
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = typeof payload.name === "string" && payload.name ? payload.name : "anonymous";
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = payload.text;
    li.append(name, text);
  } else {
    li.textContent = typeof payload === "string" ? payload : JSON.stringify(payload);
  }
  append(li);
}

function connect() {
  clearTimeout(retryTimer);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const joined = room;
  const since = lastOffset.get(joined);
  const query = since === undefined ? `history=${historyLines}` : `since=${since}`;
  const ws = new WebSocket(`${scheme}//${location.host}/ws?room=${joined}&${query}&journey=1`, "wsamqp.v1");
  socket = ws;
  setStatus("connecting", "connecting…");
  let restored = 0;
  let ready = false;
  ws.onopen = () => {
    retryDelay = 500;
    setStatus("connected", `connected to #${joined}`);
  };
  ws.onmessage = (event) => {
    if (ws !== socket) return;
    const arrived = Date.now();
    for (const text of event.data.split("\n")) {
      const line = JSON.parse(text);
      if (line.event === "gap") {
        note("Some messages may be missing: the chat's history no longer goes back that far.", "warning");
      } else if (line.event === "ready") {
        ready = true;
        if (since !== undefined && restored > 0) {
          note(`${restored} line${restored === 1 ? "" : "s"} restored after reconnecting`);
        }
      } else if (typeof line.offset === "number") {
        if (line.offset <= (lastOffset.get(joined) ?? -1)) continue; // shown already
        lastOffset.set(joined, line.offset);
        if (!ready) restored++;
        const payload = "data" in line ? line.data : line.text;
        show(payload, ready && line.t ? journey(payload, line.t, arrived) : "");
      }
    }
  };
  ws.onclose = (event) => {
    if (ws !== socket) return; // a room switch closed it
    const why = event.reason ? `: ${event.reason}` : "";
    setStatus("disconnected", `disconnected (${event.code}${why}), retrying in ${Math.round(retryDelay / 1000)}s`);
    retryTimer = setTimeout(connect, retryDelay * (0.5 + Math.random() / 2));
    retryDelay = Math.min(retryDelay * 2, maxRetryDelay);
  };
}

// switchRoom leaves the room for another: a fresh log, with its history.
function switchRoom(name) {
  if (name === room) return;
  room = name;
  roomInput.value = name;
  document.title = `#${name} · wsamqp chat`;
  lastOffset.delete(name);
  log.replaceChildren();
  const old = socket;
  socket = null;
  if (old) old.close(1000, "switching rooms");
  connect();
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = textInput.value;
  if (!text || !socket || socket.readyState !== WebSocket.OPEN) return;
  socket.send(JSON.stringify({ name: nameInput.value.trim(), text, at: Date.now() }));
  textInput.value = "";
});

roomForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const name = roomInput.value.trim().toLowerCase();
  if (!roomPattern.test(name)) {
    roomInput.setCustomValidity("a-z, 0-9, _ and -, up to 64");
    roomInput.reportValidity();
    return;
  }
  roomInput.setCustomValidity("");
  location.hash = name; // hashchange switches
});

window.addEventListener("hashchange", () => switchRoom(roomFromAddress()));

roomInput.value = room;
document.title = `#${room} · wsamqp chat`;
connect();

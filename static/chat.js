// The chat client from "A quick chat WebSockets/AMQP client", without
// jQuery. A line is only shown when the server sends it back: what you
// type goes to the broker, and the broker sends it to every page, yours too.
"use strict";

const log = document.getElementById("log");
const status = document.getElementById("status");
const form = document.getElementById("chat");
const nameInput = document.getElementById("name");
const textInput = document.getElementById("text");
const sendButton = document.getElementById("send");

nameInput.value = localStorage.getItem("wsamqp.name") || "";
nameInput.addEventListener("input", () => localStorage.setItem("wsamqp.name", nameInput.value.trim()));

let socket = null;
let retryDelay = 500; // grows to maxRetryDelay while the server is away
const maxRetryDelay = 10000;

function setStatus(state, text) {
  status.dataset.state = state;
  status.textContent = text;
  const connected = state === "connected";
  textInput.disabled = !connected;
  sendButton.disabled = !connected;
  if (connected) textInput.focus();
}

// show appends one line, as text, never as HTML. JSON chat lines show
// their name; anything else (another AMQP producer) is shown as it came.
function show(data) {
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  const li = document.createElement("li");
  let line = null;
  try { line = JSON.parse(data); } catch (_) { /* not JSON: shown as is */ }
  if (line && typeof line === "object" && typeof line.text === "string") {
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = typeof line.name === "string" && line.name ? line.name : "anonymous";
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = line.text;
    li.append(name, text);
  } else {
    li.textContent = data;
  }
  log.append(li);
  if (atBottom) li.scrollIntoView({ block: "end" }); // keep the reader's place when scrolled back
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  socket = new WebSocket(`${scheme}//${location.host}/ws`);
  setStatus("connecting", "connecting…");
  socket.onopen = () => {
    retryDelay = 500;
    setStatus("connected", "connected");
  };
  socket.onmessage = (event) => show(event.data);
  socket.onclose = (event) => {
    const why = event.reason ? `: ${event.reason}` : "";
    setStatus("disconnected", `disconnected (${event.code}${why}), retrying in ${Math.round(retryDelay / 1000)}s`);
    setTimeout(connect, retryDelay * (0.5 + Math.random() / 2));
    retryDelay = Math.min(retryDelay * 2, maxRetryDelay);
  };
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = textInput.value;
  if (!text || !socket || socket.readyState !== WebSocket.OPEN) return;
  socket.send(JSON.stringify({ name: nameInput.value.trim(), text }));
  textInput.value = "";
});

connect();

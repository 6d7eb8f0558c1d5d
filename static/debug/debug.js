// The /debug page: the bus of bus.go drawn as it runs. It polls
// /debug/state once a second and shows every bus channel with its
// listeners in priority order and how often each is published on, the
// AMQP link, and the browsers in each room. Everything is set as text.
"use strict";

const stateEl = document.getElementById("state");
const channelsEl = document.getElementById("channels");
const amqpEl = document.getElementById("amqp");
const roomsEl = document.getElementById("rooms");

let previous = null; // the last state, to turn counts into rates
let previousAt = 0;

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function render(state, at) {
  stateEl.textContent = state.bus.state;
  stateEl.dataset.state = state.bus.state;

  const before = new Map((previous ? previous.bus.channels : []).map((c) => [c.name, c.published]));
  const seconds = previous ? (at - previousAt) / 1000 : 0;
  channelsEl.replaceChildren(...state.bus.channels.map((c) => {
    const tr = document.createElement("tr");
    tr.dataset.channel = c.name;
    const rate = seconds > 0 ? (c.published - (before.get(c.name) ?? c.published)) / seconds : 0;
    const listeners = document.createElement("td");
    for (const l of c.listeners) {
      const chip = document.createElement("span");
      chip.className = "listener";
      chip.textContent = `${l.name} (${l.priority})`;
      listeners.append(chip);
    }
    tr.append(cell(c.name, "name"), cell(rate.toFixed(1), "rate"), cell(String(c.published), "published"), listeners);
    return tr;
  }));

  const link = [
    ["connected", state.amqp.connected ? "yes" : "no"],
    ["node", state.amqp.node],
    ["exchange", state.amqp.exchange],
    ["stream", state.amqp.stream],
    ["last offset", String(state.amqp.offset)],
  ];
  amqpEl.replaceChildren(...link.flatMap(([k, v]) => {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    return [dt, dd];
  }));

  const rooms = Object.entries(state.rooms).sort();
  roomsEl.replaceChildren(...(rooms.length ? rooms : [["(none)", 0]]).map(([name, n]) => {
    const li = document.createElement("li");
    li.textContent = `#${name}: ${n} browser${n === 1 ? "" : "s"}`;
    return li;
  }));
  previous = state;
  previousAt = at;
}

async function poll() {
  try {
    const response = await fetch("state", { cache: "no-store" });
    render(await response.json(), Date.now());
  } catch (err) {
    stateEl.textContent = "unreachable";
    stateEl.dataset.state = "unreachable";
  }
  setTimeout(poll, 1000);
}

poll();

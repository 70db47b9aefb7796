// glmkit chat page: talks to the same server's OpenAI API (/v1/chat/completions, streamed).
// The conversation lives in `history` (OpenAI messages); the page draws it as it streams.
// Model text is only ever set as textContent, never parsed as HTML.
// Modes: chat (tools declared in the settings are run by the user), tools and code interpreter
// (the server runs its own tools / the model's code, as offered by GET /v1/tools, and streams each
// step as an `agent_step` chunk: tool calls, results, code, its output and images).
"use strict";

const $ = (id) => document.getElementById(id);
const STRINGS = {
  en: {
    newChat: "New chat", system: "System prompt", systemHint: "Optional instructions for the assistant",
    temperature: "Temperature", topP: "Top-p", maxTokens: "Max new tokens", tools: "Tools (OpenAI JSON)",
    example: "example", toolsHint: '[{"type": "function", "function": {...}}]', apiKey: "API key",
    apiKeyHint: "only if the server asks for one", promptHint: "Message (Enter to send, Shift+Enter for a new line)",
    send: "Send", stop: "Stop", you: "You", assistant: "Assistant", toolCall: "Tool call", toolResult: "Tool result",
    resultHint: "the tool's result (JSON or text)", sendResult: "Send result", stopped: "stopped",
    error: "Error", badTools: "Tools must be a JSON list of OpenAI tools: ",
    mode: "Mode", modeChat: "Chat", modeTools: "Tools (run on the server)",
    modeInterpreter: "Code interpreter (runs on the server)", off: "off on this server",
    noteChat: "Plain chat. Tools declared below are run by you: the page asks for their results.",
    noteTools: "The server runs its tools: ",
    noteInterpreter: "The model's Python runs on the server, in a sandbox of its own for each message.",
    toolsOff: "Tools mode is off: start the server with glmkit serve --tools FILE.",
    interpreterOff: "Code interpreter mode is off: start the server with glmkit serve --code-interpreter.",
    offeredError: "Could not ask the server what it runs: ", code: "Code", codeOutput: "Code output",
    noOutput: "[no output]",
  },
  zh: {
    newChat: "新对话", system: "系统提示词", systemHint: "可选：给助手的指示",
    temperature: "温度", topP: "Top-p", maxTokens: "最多生成的词元数", tools: "工具（OpenAI JSON）",
    example: "示例", toolsHint: '[{"type": "function", "function": {...}}]', apiKey: "API 密钥",
    apiKeyHint: "仅当服务器要求时填写", promptHint: "输入消息（回车发送，Shift+回车换行）",
    send: "发送", stop: "停止", you: "你", assistant: "助手", toolCall: "工具调用", toolResult: "工具结果",
    resultHint: "工具的返回结果（JSON 或文本）", sendResult: "提交结果", stopped: "已停止",
    error: "错误", badTools: "工具必须是 OpenAI 格式的 JSON 列表：",
    mode: "模式", modeChat: "对话", modeTools: "工具（在服务器上运行）",
    modeInterpreter: "代码解释器（在服务器上运行）", off: "本服务器未启用",
    noteChat: "普通对话。下面声明的工具由你来执行：页面会请你填写结果。",
    noteTools: "服务器运行它的工具：",
    noteInterpreter: "模型写的 Python 代码在服务器上运行，每条消息一个独立的沙箱。",
    toolsOff: "工具模式未启用：请用 glmkit serve --tools FILE 启动服务器。",
    interpreterOff: "代码解释器模式未启用：请用 glmkit serve --code-interpreter 启动服务器。",
    offeredError: "无法获取服务器运行的功能：", code: "代码", codeOutput: "运行结果",
    noOutput: "[无输出]",
  },
};
const EXAMPLE_TOOLS = [{
  type: "function",
  function: {
    name: "get_weather", description: "Get the current weather of a city",
    parameters: { type: "object", properties: { city: { type: "string", description: "城市名 / city name" } },
      required: ["city"] },
  },
}];

let lang = localStorage.getItem("glmkit.lang") || (navigator.language.startsWith("zh") ? "zh" : "en");
let model = null;
let history = [];       // OpenAI messages of this conversation, system prompt excluded
let controller = null;  // the AbortController of the reply being streamed
let waitingTools = [];  // tool calls of the last reply still waiting for their results
let offered = { tools: [], interpreter: false, error: null };  // what the server runs itself (GET /v1/tools)

const t = (key) => STRINGS[lang][key];

function applyLanguage() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  $("lang").textContent = lang === "zh" ? "English" : "中文";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  showModes();
}

async function loadOffered() {
  try {
    const r = await fetch("/v1/tools", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    offered = {
      tools: body.data.filter((d) => d.type === "server_tool").map((d) => d.name),
      interpreter: body.data.some((d) => d.type === "code_interpreter"), error: null,
    };
  } catch (e) {
    offered = { tools: [], interpreter: false, error: String(e.message || e) };
  }
  showModes();
}

// A mode the server does not offer is disabled, and the note says which flag turns it on.
function showModes() {
  const available = { chat: true, tools: offered.tools.length > 0, interpreter: offered.interpreter };
  for (const option of $("mode").options) {
    option.disabled = !available[option.value];
    option.textContent = t(option.dataset.i18n) + (option.disabled ? ` (${t("off")})` : "");
  }
  if (!available[$("mode").value]) $("mode").value = "chat";
  const mode = $("mode").value;
  const notes = [{ chat: t("noteChat"), tools: t("noteTools") + offered.tools.join(", "),
    interpreter: t("noteInterpreter") }[mode]];
  if (offered.error) notes.push(t("offeredError") + offered.error);
  if (!offered.error && !available.tools) notes.push(t("toolsOff"));
  if (!offered.error && !available.interpreter) notes.push(t("interpreterOff"));
  $("mode-note").textContent = notes.join("\n");
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    model = body.data[0].id;
    $("model-name").textContent = model;
  } catch (e) {
    addBubble("error", "error", String(e.message || e));
  }
}

// label: a key of STRINGS (redrawn when the language changes) or, for tool cards, text as is.
function addBubble(kind, label, text) {
  const el = document.createElement("div");
  el.className = "msg " + kind;
  const role = document.createElement("span");
  role.className = "role";
  if (label in STRINGS.en) role.dataset.i18n = label;
  role.textContent = label in STRINGS.en ? t(label) : label;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  el.append(role, body);
  $("messages").append(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("prompt").disabled = busy;
}

function tools() {
  const text = $("tools").value.trim();
  if (!text) return null;
  const parsed = JSON.parse(text);  // a SyntaxError is shown to the user
  if (!Array.isArray(parsed)) throw new Error("not a list");
  return parsed.length ? parsed : null;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  const body = {
    model, stream: true, messages: messages.concat(history),
    temperature: Number($("temperature").value), top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value) || undefined,
  };
  let declared;
  try { declared = tools(); } catch (e) { throw new Error(t("badTools") + e.message); }
  const mode = $("mode").value;
  const server = mode === "tools" ? offered.tools.map((name) => ({ type: "server_tool", name }))
    : mode === "interpreter" ? [{ type: "code_interpreter" }] : [];
  const all = server.concat(declared || []);
  if (all.length) body.tools = all;
  return body;
}

// Reads an SSE body: calls onEvent(json) for each `data:` event until [DONE].
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function reply() {
  let body;
  try { body = requestBody(); } catch (e) { addBubble("error", "error", e.message); return; }
  // The reply's text streams into an assistant bubble; a server-side step closes it, and the text
  // after the step goes into a new one, so the page shows text and steps in the order they came.
  let bubble = null;
  let shown = "";
  const openBubble = () => { bubble = addBubble("assistant streaming", "assistant", ""); shown = ""; };
  const closeBubble = () => {
    bubble.classList.remove("streaming");
    if (!shown && !bubble.classList.contains("stopped")) bubble.remove();  // a bare tool call has its card
  };
  openBubble();
  const message = { role: "assistant", content: "" };
  const calls = [];
  let finish = null;
  controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : `${response.status} ${response.statusText}`);
    }
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.agent_step) {
        closeBubble();
        showStep(chunk.agent_step);
        openBubble();
        return;
      }
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      const delta = choice.delta || {};
      if (delta.content) {
        message.content += delta.content;
        shown += delta.content;
        bubble.querySelector(".text").textContent = shown.trimStart();  // a later round's text starts after "\n\n"
        bubble.scrollIntoView({ block: "end" });
      }
      for (const piece of delta.tool_calls || []) {
        if (piece.id) calls[piece.index] = { id: piece.id, type: "function", function: { name: piece.function.name, arguments: "" } };
        calls[piece.index].function.arguments += piece.function.arguments || "";
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
  } catch (e) {
    if (e.name === "AbortError") {
      const mark = document.createElement("span");
      mark.className = "role";
      mark.dataset.i18n = "stopped";
      mark.textContent = t("stopped");
      bubble.classList.add("stopped");
      bubble.append(mark);
    } else {
      addBubble("error", "error", String(e.message || e));
    }
  } finally {
    closeBubble();
    controller = null;
    setBusy(false);
  }
  if (message.content || calls.length) {
    if (calls.length) message.tool_calls = calls;
    history.push(message);
  }
  if (finish === "tool_calls") showToolCalls(calls);
}

// One step the server ran: a tool call or its result, code or its output (images inline).
function showStep(step) {
  if (step.type === "tool_call") {
    const call = step.arguments === null ? step.text : `${step.name}(${JSON.stringify(step.arguments)})`;
    addBubble("tool-call server", `${t("toolCall")} · ${step.name}`, call);
  } else if (step.type === "tool_result") {
    addBubble("tool-result server" + (step.error ? " failed" : ""), `${t("toolResult")} · ${step.name}`, step.text);
  } else if (step.type === "code") {
    const card = addBubble("code", "code", "");
    const pre = document.createElement("pre");
    pre.textContent = step.text;
    card.querySelector(".text").replaceChildren(pre);
  } else if (step.type === "code_output") {
    const card = addBubble("code-output" + (step.status === "ok" ? "" : " failed"), "codeOutput", "");
    const body = card.querySelector(".text");
    for (const output of step.outputs || []) {
      if (output.type === "image") {
        const image = step.images[output.image];
        const img = document.createElement("img");
        img.src = `data:${image.mime};base64,${image.data}`;
        img.alt = output.text;
        body.append(img);
      } else {
        const pre = document.createElement("pre");
        pre.className = "out " + output.type;
        pre.textContent = output.text;
        body.append(pre);
      }
    }
    for (const note of step.notes || []) {
      const line = document.createElement("div");
      line.className = "note";
      line.textContent = `[${note}]`;
      body.append(line);
    }
    if (!body.childNodes.length) body.textContent = t("noOutput");
  }
}

function showToolCalls(calls) {
  waitingTools = calls.map((c) => c.id);
  for (const call of calls) {
    const card = addBubble("tool-call", `${t("toolCall")} · ${call.function.name}`,
      `${call.function.name}(${call.function.arguments})`);
    card.dataset.callId = call.id;
    const form = document.createElement("form");
    const input = document.createElement("textarea");
    input.rows = 2;
    input.placeholder = t("resultHint");
    const button = document.createElement("button");
    button.type = "submit";
    button.textContent = t("sendResult");
    form.append(input, button);
    card.append(form);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      form.remove();
      history.push({ role: "tool", tool_call_id: call.id, content: input.value });
      addBubble("tool-result", `${t("toolResult")} · ${call.function.name}`, input.value);
      waitingTools = waitingTools.filter((id) => id !== call.id);
      if (!waitingTools.length) reply();
    });
  }
}

function send(event) {
  event.preventDefault();
  const content = $("prompt").value.trim();
  if (!content || controller || waitingTools.length) return;
  $("prompt").value = "";
  history.push({ role: "user", content });
  addBubble("user", "you", content);
  reply();
}

function bindSlider(id) {
  const update = () => { $(id + "-value").textContent = $(id).value; };
  $(id).addEventListener("input", update);
  update();
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) send(event);
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  waitingTools = [];
  $("messages").replaceChildren();
});
$("lang").addEventListener("click", () => {
  lang = lang === "zh" ? "en" : "zh";
  localStorage.setItem("glmkit.lang", lang);
  applyLanguage();
});
$("tools-example").addEventListener("click", () => { $("tools").value = JSON.stringify(EXAMPLE_TOOLS, null, 2); });
$("api-key").value = localStorage.getItem("glmkit.apiKey") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("glmkit.apiKey", $("api-key").value);
  loadModel();
  loadOffered();
});
$("mode").addEventListener("change", showModes);
bindSlider("temperature");
bindSlider("top-p");
applyLanguage();
loadModel();
loadOffered();

// The official openai Node SDK (openai/realtime/ws) holding a spoken conversation over wss://.
// usage: NODE_EXTRA_CA_CERTS=cert.pem node realtime_converse.mjs BASE_URL IN.pcm OUT.pcm
// Streams IN.pcm (24 kHz pcm16: a question, then silence) under server VAD, waits for the
// answer, writes its audio to OUT.pcm and prints one JSON line:
// {"heard": "...", "answer": "...", "status": "...", "types": [...], "url": "..."};
// exits 1 on an error event or timeout.
import fs from 'node:fs';
import OpenAI from 'openai';
import { OpenAIRealtimeWS } from 'openai/realtime/ws';

const [baseURL, inPath, outPath] = process.argv.slice(2);
const client = new OpenAI({ apiKey: 'unused-on-loopback', baseURL });
const rt = new OpenAIRealtimeWS({ model: 'gpt-realtime' }, client);
const fail = (why) => { console.error(why); process.exit(1); };
const timer = setTimeout(() => fail('timed out'), 60000);
const types = [];
const audio = [];
let heard = '';
let answer = '';

rt.on('error', (err) => fail(`error: ${err.message}`));
rt.on('event', (e) => types.push(e.type));
rt.on('conversation.item.input_audio_transcription.completed', (e) => { heard = e.transcript; });
rt.on('response.output_audio_transcript.delta', (e) => { answer += e.delta; });
rt.on('response.output_audio.delta', (e) => { audio.push(Buffer.from(e.delta, 'base64')); });
rt.on('response.done', (e) => {
  fs.writeFileSync(outPath, Buffer.concat(audio));
  const url = rt.url.toString();
  console.log(JSON.stringify({ heard, answer, status: e.response.status, types, url }));
  clearTimeout(timer);
  rt.close();
});
rt.socket.on('open', () => {
  rt.send({
    type: 'session.update',
    session: {
      type: 'realtime',
      audio: {
        input: { turn_detection: { type: 'server_vad', silence_duration_ms: 500 } },
        output: { voice: 'nova' },
      },
    },
  });
  const pcm = fs.readFileSync(inPath);
  for (let i = 0; i < pcm.length; i += 4800) {
    rt.send({ type: 'input_audio_buffer.append', audio: pcm.subarray(i, i + 4800).toString('base64') });
  }
});
